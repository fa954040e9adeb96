"""The async Python SDK: publish a prompt, follow its progress, await its one outcome.

    async with await KilnClient.connect("nats://127.0.0.1:14222") as kiln:
        outcome = await kiln.generate("a red circle", user_id="alice")
        if isinstance(outcome, ImageDelivered):
            png = await kiln.download(outcome)  # or a link to it: kiln.link(user, request)

`generate` subscribes to everything said about its request before publishing, then also
looks up outcomes already recorded (for a request re-published after a lost reply). If no
outcome arrives within `resubmit_after_s` it publishes the same prompt again: the
`request_id` makes that idempotent, and it survives a lost bus write.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
from opentelemetry import trace

from shared import subjects
from shared.access import Access
from shared.bus import Bus, Message
from shared.events import (
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    TERMINAL,
    ImageDelivered,
    ImageLink,
    PromptSubmitted,
    QuotaStatus,
    RenderProgress,
    RequestFailed,
    TurnComposed,
    check_ids,
)
from shared.records import Outcome, read_outcome
from shared.subjects import Channel
from shared.telemetry import mark_failed, trace_id_in, user_attributes

ProgressCallback = Callable[[RenderProgress], None]

tracer = trace.get_tracer("kiln.client")
log = logging.getLogger("kiln.client")

ANNOUNCED_LOOKUPS, ANNOUNCED_LOOKUP_PAUSE_S = 20, 0.05
RECONNECT_CHECK_S = 1.0  # how soon a wait notices that its connection moved to another server


class ServiceUnavailable(Exception):
    """A service did not answer a question (quota's status, context's styles, delivery's
    link)."""


# What a client does on the bus: send prompts and cancels, hear progress and outcomes, read
# outcomes and quota's decisions (the trace a request runs in), store masks, ask the services
# (a conversation's turns come from context, an image's download link from delivery). The playground (delivery) acts for its
# signed-in users through the same SDK. With auth on, a user's own credential narrows all of
# it to that user's subjects (`infra.nats_auth`).
CLIENT_CHANNELS = (
    subjects.PROMPT_SUBMITTED,
    subjects.RENDER_CANCEL,
    subjects.QUOTA_STATUS,
    subjects.QUOTA_PRESSURE,
    subjects.CONTEXT_STYLES,
    subjects.CONTEXT_TURNS,
    subjects.DELIVERY_LINK,
)
CLIENT_HEARS = (subjects.RENDER_PROGRESS, subjects.OUTCOME, subjects.FLEET_TELEMETRY)
CLIENT_READS = (subjects.OUTCOMES, subjects.QUOTA)
CLIENT_ACCESS = Access(
    publish=frozenset(c.pattern for c in CLIENT_CHANNELS),
    subscribe=frozenset(c.pattern for c in CLIENT_HEARS),
    streams=frozenset(s.name for s in CLIENT_READS),
    buckets=frozenset({subjects.IMAGES.name}),
)


class KilnClient:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, nats_url: str, credentials: Path | None = None, identity: str = "client") -> KilnClient:
        """Connect, or raise nats.errors.NoServersError within a few seconds. `credentials`:
        a NATS credential (a user's own, or a service's), and `identity` the name it was
        made for (a user's id): its replies come to that identity's inbox."""

        async def on_error(error: Exception) -> None:
            log.debug("NATS: %s", error)  # what matters reaches the caller as an exception

        bus = await Bus.connect(
            nats_url,
            identity,
            tracer,
            CLIENT_ACCESS,
            credentials,
            connect_timeout=2,
            max_reconnect_attempts=3,
            reconnect_time_wait=1,
            error_cb=on_error,
        )
        return cls(bus)

    async def close(self) -> None:
        await self.bus.close()

    async def __aenter__(self) -> KilnClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def submit(self, submission: PromptSubmitted) -> None:
        """Publish a prompt (idempotent: the same `request_id` is only taken once)."""
        check_ids(submission)
        msg_id = f"{submission.user_id}:{submission.request_id}:prompt-submitted"
        await self.bus.publish(subjects.prompt_submitted(submission.user_id), submission, msg_id=msg_id)

    async def generate(
        self,
        prompt: str,
        *,
        user_id: str,
        conversation_id: str = "",
        request_id: str | None = None,
        width: int = DEFAULT_SIZE,
        height: int = DEFAULT_SIZE,
        steps: int = DEFAULT_STEPS,
        seed: int | None = None,
        style: str | None = None,
        edit_of: str | None = None,
        strength: float = 0.8,
        mask_key: str | None = None,
        on_progress: ProgressCallback | None = None,
        timeout_s: float = 120,
        resubmit_after_s: float = 30,
    ) -> Outcome:
        """Ask for an image and wait for the request's outcome: delivered, denied or failed.
        An edit names the earlier request whose image it starts from (`edit_of`, or "last"
        for the conversation's latest image), and may add a mask from `upload_mask` to
        repaint only part of it. `style` picks a style preset for the conversation.

        Raises ValueError for ids that cannot be used, TimeoutError if no outcome arrives."""
        submission = PromptSubmitted(
            request_id=request_id or uuid.uuid4().hex,
            user_id=user_id,
            conversation_id=conversation_id,
            prompt=prompt,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            style=style,
            edit_of=edit_of,
            strength=strength,
            mask_key=mask_key,
        )
        check_ids(submission)
        # The request as its client sees it (CLIENT): the root of its trace, unless the
        # caller's own span (the CLI's, the playground's) is. Its publishes are spans of their own.
        with tracer.start_as_current_span(
            "kiln generate",
            kind=trace.SpanKind.CLIENT,
            attributes={"kiln.request_id": submission.request_id, **user_attributes(user_id)},
        ) as span:
            outcome = await self._follow(
                user_id, submission.request_id, submission, on_progress, timeout_s, resubmit_after_s
            )
            if isinstance(outcome, RequestFailed):  # (a denial is an answer, not a failure)
                mark_failed(span, f"{outcome.stage} {outcome.reason}: {outcome.detail}")
            return outcome

    async def cancel(self, user_id: str, request_id: str) -> None:
        """Ask render to drop the request: before it starts, or between two steps. The
        request then ends as RequestFailed(reason="cancelled") and its quota is refunded.
        Kept in a stream, so a job still on its way to render is dropped when it arrives."""
        await self.bus.publish_marker(subjects.render_cancel(user_id, request_id), f"{user_id}:{request_id}:cancel")

    async def quota(self, user_id: str, timeout_s: float = 5) -> QuotaStatus:
        """Today's usage and limit for the user, from the quota service. Raises
        ServiceUnavailable if quota does not answer or cannot tell."""
        return await self._ask(subjects.QUOTA_STATUS, (user_id,), timeout_s)

    async def pressure(self, timeout_s: float = 5) -> dict[str, str]:
        """The fleet pressure quota sheds load by: {"level": …, "why": …}."""
        return await self._ask(subjects.QUOTA_PRESSURE, (), timeout_s)

    async def styles(self, timeout_s: float = 5) -> dict[str, str]:
        """The style presets context offers: name → title."""
        return await self._ask(subjects.CONTEXT_STYLES, (), timeout_s)

    async def _ask(self, channel: Channel, tokens: tuple[str, ...], timeout_s: float) -> Any:
        """Ask a request/reply channel; its answer is decoded as the type it declares."""
        service = channel.template.split(".")[1]  # kiln.<service>.…
        try:
            reply = await self.bus.request(channel.subject(*tokens), timeout_s)
        except nats.errors.NoRespondersError:
            raise ServiceUnavailable(f"{service} is not running") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise ServiceUnavailable(f"{service} did not answer within {timeout_s:g} s") from None
        try:
            return msgspec.json.decode(reply, type=channel.reply)
        except msgspec.DecodeError:
            pass
        try:
            error = str(msgspec.json.decode(reply, type=dict).get("error"))
        except msgspec.DecodeError:
            error = "an answer this client cannot read"
        raise ServiceUnavailable(f"{service}: {error}")

    async def conversation(self, user_id: str, conversation_id: str) -> list[TurnComposed]:
        """The conversation's turns so far, oldest first, as context composed them."""
        return await self._ask(subjects.CONTEXT_TURNS, (user_id, conversation_id), timeout_s=10)

    async def upload_mask(self, user_id: str, png: bytes) -> str:
        """Store an inpainting mask (white = repaint) and return its key for `generate`."""
        key = f"{user_id}/masks/{uuid.uuid4().hex}.png"
        await (await self.bus.object_store(subjects.IMAGES)).put(key, png)
        return key

    async def wait_for_outcome(
        self,
        user_id: str,
        request_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        timeout_s: float = 120,
    ) -> Outcome:
        """Wait for the outcome of a request submitted earlier (by anyone), without
        submitting it again. Raises TimeoutError if none arrives."""
        return await self._follow(user_id, request_id, None, on_progress, timeout_s, timeout_s)

    async def _follow(
        self,
        user_id: str,
        request_id: str,
        submission: PromptSubmitted | None,
        on_progress: ProgressCallback | None,
        timeout_s: float,
        resubmit_after_s: float,
    ) -> Outcome:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        # Subscribe before publishing or looking anything up, so nothing falls in between.
        subscriptions = [
            await self.bus.listen(subject(user_id, request_id), inbox.put)
            for subject in (subjects.render_progress, subjects.outcome)
        ]
        try:
            deadline = loop.time() + timeout_s
            first = True
            while True:
                # An outcome recorded already (or missed while reconnecting) ends the wait;
                # checked before any (re-)submission, which past the bus's duplicate
                # window would otherwise start the request afresh.
                recorded = await self.recorded_outcome(user_id, request_id)
                if recorded is not None:
                    return recorded
                if loop.time() >= deadline:
                    raise TimeoutError(f"no outcome for request {request_id} within {timeout_s:.0f}s")
                if submission is not None:
                    await self._submit_again(submission, first)
                first = False
                resubmit_at = min(deadline, loop.time() + resubmit_after_s)
                if await self._outcome_announced(inbox, resubmit_at, on_progress):
                    recorded = await self._recorded_soon(user_id, request_id)
                    if recorded is not None:
                        return recorded
        finally:
            for subscription in subscriptions:
                await subscription.unsubscribe()

    async def _recorded_soon(self, user_id: str, request_id: str) -> Outcome | None:
        """The outcome just announced. A subscriber can hear a message a moment before the
        stream answers for it, so look a few times before going back to waiting."""
        for _ in range(ANNOUNCED_LOOKUPS):
            recorded = await self.recorded_outcome(user_id, request_id)
            if recorded is not None:
                return recorded
            await asyncio.sleep(ANNOUNCED_LOOKUP_PAUSE_S)
        return None  # a refused second outcome, say: the stored one is still to come

    async def _submit_again(self, submission: PromptSubmitted, first: bool) -> None:
        try:
            await self.submit(submission)
        except nats.errors.Error:
            if first:
                raise  # the prompt never reached the bus: the caller must know
            # A re-submission is insurance for a request already accepted; failing it
            # leaves the request as it was, so keep waiting for its outcome.
            log.warning("re-submitting %s failed; still waiting", submission.request_id)

    async def _outcome_announced(
        self, inbox: asyncio.Queue[Message], until: float, on_progress: ProgressCallback | None
    ) -> bool:
        """Pass progress on until an outcome is announced (True) or `until` (False).

        An announcement is only a cue: a plain subscriber also sees a second outcome that
        JetStream refused to store, so the caller reads the stored, first one. The
        connection moving to another server (one of a cluster died) is a cue too: an
        announcement made meanwhile was not heard."""
        loop = asyncio.get_running_loop()
        rendering = False
        reconnects = self.bus.reconnects
        while (remaining := until - loop.time()) > 0:
            try:
                msg = await asyncio.wait_for(inbox.get(), min(remaining, RECONNECT_CHECK_S))
            except TimeoutError:
                if self.bus.reconnects != reconnects:
                    return True
                continue
            try:
                event = msg.event()
            except msgspec.DecodeError:
                continue  # not ours to judge; the services dead-letter what they cannot read
            if isinstance(event, RenderProgress) and on_progress is not None:
                # A queue report can trail the job's first step by a moment: once it
                # renders, its place in the queue is old news.
                if event.state == "rendering" or not rendering:
                    on_progress(event)
                rendering = rendering or event.state == "rendering"
            elif isinstance(event, TERMINAL):
                return True
        return False

    async def recorded_outcome(self, user_id: str, request_id: str) -> Outcome | None:
        """The request's outcome if JetStream holds one."""
        return await read_outcome(self.bus, user_id, request_id)

    async def trace_id(self, user_id: str, request_id: str) -> str | None:
        """The trace the request runs in, the one with its render: that of quota's decision
        (context and render continue it; kept a week), else of its outcome (kept a year).
        None before either is recorded. A client waiting on a request it did not submit
        (`--request-id`) is in a trace of its own; this is the one to look at."""
        for stream, subject in (
            (subjects.QUOTA, subjects.quota_decided(user_id, request_id)),
            (subjects.OUTCOMES, subjects.outcome(user_id, request_id)),
        ):
            stored = await self.bus.last_message(stream, subject)
            if stored is not None and (trace_id := trace_id_in(stored.headers)):
                return trace_id
        return None

    async def link(self, user_id: str, request_id: str, timeout_s: float = 5) -> ImageLink:
        """A download link for the request's image, signed by delivery now; it works until
        its `expires_at` (a day at most), and then another can be asked for. Outcomes hold
        no link (they are kept a year). Raises ServiceUnavailable if delivery does not
        answer, or has no image for the request."""
        return await self._ask(subjects.DELIVERY_LINK, (user_id, request_id), timeout_s)

    async def download(self, delivered: ImageDelivered) -> bytes:
        """The delivered image's PNG, through a link signed for it now."""
        link = await self.link(delivered.user_id, delivered.request_id)
        async with httpx.AsyncClient() as http:
            response = await http.get(link.url, timeout=30)
            response.raise_for_status()
            return response.content
