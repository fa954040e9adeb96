"""How long context takes to read a conversation before composing its next turn.

Context reads a conversation's turns (`shared.records.read_turns`: the last sequence, then a
short-lived consumer that fetches the subject in one go) and then appends the new turn. This measures that read at 10, 100 and 500 turns (500 is the
limit in context.toml) and one append, on embedded NATS (fsync on every write) unless
KILN_NATS_URL is set. Prints the medians and writes bench/results/conversation_reads.json.

    python -m bench.conversation_reads [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from infra.embedded import EmbeddedNats, free_port
from services.context.__main__ import SERVICE as CONTEXT
from shared import subjects
from shared.bus import Bus
from shared.events import Composition, TurnComposed
from shared.records import read_turns
from shared.settings import Settings
from shared.telemetry import setup

RESULTS = Path(__file__).parent / "results"
SIZES = (10, 100, 500)


def _turn(user: str, conversation: str, i: int) -> TurnComposed:
    text = f"a red circle, with {i} stripes"
    return TurnComposed(
        request_id=f"r{i}",
        user_id=user,
        conversation_id=conversation,
        prompt=text,
        composition=Composition(text=text, subject=text),
    )


async def run(url: str, repeats: int) -> dict:
    # The bench does what context does (read a conversation, append a turn): its access.
    bus = await Bus.connect(url, "bench", setup("bench", None), CONTEXT.access())
    await bus.declare()
    user, figures = f"u{uuid.uuid4().hex[:8]}", {}
    try:
        for size in SIZES:
            conversation = f"c{size}"
            subject = subjects.conversation(user, conversation)
            for i in range(size):
                await bus.publish(subject, _turn(user, conversation, i))
            reads = []
            for _ in range(repeats):
                start = time.perf_counter()
                turns, last = await read_turns(bus, user, conversation)
                reads.append((time.perf_counter() - start) * 1000)
                assert len(turns) == size
            appends = []
            for i in range(repeats):
                start = time.perf_counter()
                appended = await bus.publish(subject, _turn(user, conversation, size + i), after_seq=last)
                appends.append((time.perf_counter() - start) * 1000)
                assert appended
                stored = await bus.last_message(subjects.CONVERSATIONS, subject)
                assert stored is not None
                last = stored.seq
            figures[f"{size}_turns"] = {
                "read_ms_p50": round(statistics.median(reads), 2),
                "read_ms_per_turn": round(statistics.median(reads) / size, 3),
                "append_ms_p50": round(statistics.median(appends), 2),
            }
            print(
                f"{size:>4} turns: read p50 {figures[f'{size}_turns']['read_ms_p50']} ms "
                f"({figures[f'{size}_turns']['read_ms_per_turn']} ms a turn), "
                f"append p50 {figures[f'{size}_turns']['append_ms_p50']} ms"
            )
    finally:
        await bus.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    url = Settings.from_env().nats_url
    with tempfile.TemporaryDirectory() as scratch:
        server = None
        if not url:
            server = EmbeddedNats(Path(scratch), free_port())
            url = server.start()
        try:
            figures = asyncio.run(run(url, args.repeats))
        finally:
            if server:
                server.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "conversation_reads.json"
    out.write_text(json.dumps({"nats": "embedded" if server else url, **figures}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
