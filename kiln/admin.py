"""Operator commands: `kiln accounts …` and `kiln audit …`. They talk to the quota
database directly (KILN_DATABASE_URL, or the embedded default), bringing its schema up
to date first."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import nats.errors
import nats.js.errors
from opentelemetry import trace
from rich.console import Console
from rich.table import Table

from infra.nats_auth import (
    Authority,
    credentials_file,
    declarations,
    permission_table,
    service_permissions,
    user_credentials_file,
    user_permissions,
)
from services.quota import accounts, audit, checkpoints, plans, policy
from services.quota import log as quota_log
from services.quota.migrate import upgrade
from shared import subjects
from shared.access import Access
from shared.bus import PUBLISH_RETRY_S, Bus
from shared.events import ID_PATTERN, as_utc
from shared.settings import Settings, SettingsError

EXIT_FOUND_PROBLEMS, EXIT_BAD_REQUEST = 1, 64
AUDITOR = "auditor"  # `kiln audit`'s NATS identity: reads the checkpoint stream, nothing else

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def add_commands(commands: argparse._SubParsersAction) -> None:
    acc = commands.add_parser("accounts", help="users and their plans").add_subparsers(dest="action", required=True)
    add = acc.add_parser("add", help="give a user an account on a plan")
    add.add_argument("user")
    add.add_argument("plan")
    add.set_defaults(run=_database_command(_accounts_add))
    set_plan = acc.add_parser("set-plan", help="move a user to another plan")
    set_plan.add_argument("user")
    set_plan.add_argument("plan")
    set_plan.set_defaults(run=_database_command(_accounts_set_plan))
    add_user = acc.add_parser("add-user", help="a NATS credential for a user: their own subjects only")
    add_user.add_argument("user")
    add_user.add_argument("--days", type=float, default=30, help="how long it is valid (default 30)")
    add_user.add_argument("-o", "--output", type=Path, help="where to write it (default: <data>/nats/users/USER.creds)")
    add_user.set_defaults(run=_accounts_add_user)
    acc.add_parser("permissions", help="what each service and a user may do on the bus").set_defaults(
        run=_accounts_permissions
    )
    acc.add_parser("nats-config", help="the nats-server config that makes your own NATS trust Kiln").set_defaults(
        run=_accounts_nats_config
    )
    acc.add_parser("list", help="accounts with today's usage").set_defaults(run=_database_command(_accounts_list))
    usage = acc.add_parser("usage", help="everyone who used images on a UTC day, with their plan and limit")
    usage.add_argument("--date", type=_day, help="the UTC day, YYYY-MM-DD (default: today)")
    usage.set_defaults(run=_database_command(_accounts_usage))
    watch = acc.add_parser("watch", help="who went past their plan's soft cap on a UTC day, and by which requests")
    watch.add_argument("--date", type=_day, help="the UTC day, YYYY-MM-DD (default: today)")
    watch.set_defaults(run=_database_command(_accounts_watch, read_only=True))
    grant = acc.add_parser("grant", help="allow a user more images today (logged as QuotaAdjusted)")
    grant.add_argument("user")
    grant.add_argument("images", type=int)
    grant.add_argument("--note", default="")
    grant.set_defaults(run=_database_command(_accounts_grant))

    aud = commands.add_parser("audit", help="check and export the quota log").add_subparsers(
        dest="action", required=True
    )
    replay = aud.add_parser("replay", help="re-run the recorded policy over the log; exit 1 on any mismatch")
    replay.add_argument("--user")
    replay.add_argument("--since", type=_timestamp, help="ISO time, e.g. 2026-11-26T00:00Z")
    replay.add_argument("--partition", type=_partition, help="one partition of the log's users (0…N-1)")
    replay.set_defaults(run=_database_command(_audit_replay, read_only=True))
    verify = aud.add_parser(
        "verify", help="check the hash chain and quota's signed checkpoints; exit 1 naming the first problem"
    )
    verify.add_argument(
        "--checkpoints", type=Path, help="an exported checkpoints file (default: read the checkpoint stream)"
    )
    verify.add_argument(
        "--public-key", type=Path, help="quota's checkpoint public key, hex (default: <data>/audit/checkpoint.pub)"
    )
    verify.add_argument("--no-checkpoints", action="store_true", help="check the chain alone")
    verify.add_argument("--partition", type=_partition, help="check one partition's chain (0…N-1); default: all")
    verify.set_defaults(run=_database_command(_audit_verify, read_only=True))
    export = aud.add_parser("export", help="write the events as JSON lines")
    export.add_argument("--user")
    export.add_argument("--since", type=_timestamp)
    export.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    export.add_argument("--checkpoints", type=Path, help="also write the signed checkpoints to this file")
    export.set_defaults(run=_database_command(_audit_export, read_only=True))
    aud.add_parser("rebuild", help="drop the usage projections and rebuild them from the log").set_defaults(
        run=_database_command(_audit_rebuild)
    )


def _accounts_add_user(args: argparse.Namespace) -> int:
    """Mint the user's credential with Kiln's keys (they stay on the operator's machine)."""
    settings = Settings.from_env()
    if not ID_PATTERN.match(args.user):
        err.print(f"kiln: a user id is 1-64 letters, digits, _ or -, not {args.user!r}")
        return EXIT_BAD_REQUEST
    if not Authority.exists(settings.data_dir):
        err.print(f"kiln: no Kiln keys in {settings.data_dir}/nats/auth: start Kiln once (`make run`)")
        return EXIT_BAD_REQUEST
    path = args.output or user_credentials_file(settings.data_dir, args.user)
    Authority.open(settings.data_dir).write_credentials(
        path, args.user, user_permissions(args.user), ttl_s=args.days * 24 * 3600
    )
    out.print(f"wrote {path} (valid {args.days:g} days): KILN_NATS_CREDS={path} kiln generate …")
    return 0


def _accounts_permissions(args: argparse.Namespace) -> int:
    out.print(permission_table(declarations()), markup=False, highlight=False)
    return 0


def _accounts_nats_config(args: argparse.Namespace) -> int:
    """For an external NATS (KILN_NATS_URL): add this to its config, and Kiln's credentials work there."""
    settings = Settings.from_env()
    out.print(Authority.open(settings.data_dir).server_config(), markup=False, highlight=False, end="")
    return 0


def _partition(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a partition number (0, 1, …): {text!r}")
    return int(text)


def _timestamp(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from None
    return as_utc(moment)


def _day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day as YYYY-MM-DD: {text!r}") from None


Command = Callable[[argparse.Namespace, asyncpg.Pool, Settings], Awaitable[int]]


def _database_command(command: Command, *, read_only: bool = False) -> Callable[[argparse.Namespace], int]:
    """`read_only`: an audit, run as the auditor's role (it may only read), not the owner."""

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_with_database(command, args, read_only))
        except (accounts.AccountError, plans.ConfigError, SettingsError) as error:
            err.print(f"kiln: {error}")
            return EXIT_BAD_REQUEST
        except (OSError, asyncpg.PostgresError) as error:
            err.print(f"kiln: cannot use the quota database: {error}")
            return EXIT_BAD_REQUEST

    return run


async def _with_database(command: Command, args: argparse.Namespace, read_only: bool) -> int:
    settings = Settings.from_env()
    if read_only:
        url = settings.audit_database_address
    else:
        url = settings.database_address
        await asyncio.to_thread(upgrade, url)
    pool = await quota_log.connect(url, size=2)
    try:
        return await command(args, pool, settings)
    finally:
        await pool.close()


async def _accounts_add(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    async with pool.acquire() as conn:
        await accounts.add(conn, plans.load(settings.plans_file), args.user, args.plan)
    out.print(f"{args.user}: on {args.plan}")
    return 0


async def _accounts_set_plan(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    async with pool.acquire() as conn:
        await accounts.set_plan(conn, plans.load(settings.plans_file), args.user, args.plan)
    out.print(f"{args.user}: now on {args.plan}")
    return 0


async def _accounts_list(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    config = plans.load(settings.plans_file)
    table = Table("user", "plan", "used today", "allowed today", "since")
    async with pool.acquire() as conn:
        for row in await accounts.listing(conn):
            plan = config.plans.get(row["plan"])
            allowed = str(plan.daily_limit + row["extra_today"]) if plan else "? (plan not in the plans file)"
            table.add_row(
                row["user_id"], row["plan"], str(row["used_today"]), allowed, f"{row['updated_at']:%Y-%m-%d %H:%M}"
            )
    out.print(table)
    return 0


async def _accounts_usage(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    config = plans.load(settings.plans_file)
    day = args.date or policy.utc_day(datetime.now(UTC))
    async with pool.acquire() as conn:
        rows = await accounts.usage_on(conn, day)
    if not rows:
        out.print(f"nobody used images on {day} (UTC)")
        return 0
    table = Table("user", "plan", "used", "granted", "refunded", "added by admin", "allowed", "left")
    for row in rows:
        table.add_row(*_usage_row(row, config))
    out.print(table)
    used = sum(row["granted"] - row["refunded"] for row in rows)
    out.print(f"{len(rows)} users, {used} images used on {day} (UTC)")
    return 0


async def _accounts_watch(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    config = plans.load(settings.plans_file)
    day = args.date or policy.utc_day(datetime.now(UTC))
    async with pool.acquire() as conn:
        rows = await accounts.over_soft_cap(conn, day)
    if not rows:
        out.print(f"nobody went past a soft cap on {day} (UTC)")
        return 0
    table = Table("user", "plan", "used", "soft cap", "grants past it", "since", "requests past it")
    for row in rows:
        plan = config.plans.get(row["plan"])
        cap = str(plan.soft_cap) if plan else "? (plan not in the plans file)"
        shown = ", ".join(row["requests"][:3]) + (
            f" (+{len(row['requests']) - 3} more)" if len(row["requests"]) > 3 else ""
        )
        table.add_row(
            row["user_id"], row["plan"], str(row["used"]), cap, str(row["flagged"]), f"{row['since']:%H:%M:%S}", shown
        )
    out.print(table)
    out.print(f"{len(rows)} users past their soft cap on {day} (UTC)")
    return 0


def _usage_row(row: asyncpg.Record, config: plans.Config) -> list[str]:
    """A user's day: a user without an account is on the default plan, and says so."""
    plan_name = row["plan"] or plans.DEFAULT_PLAN
    shown_plan = plan_name if row["plan"] else f"{plan_name} (no account)"
    used = row["granted"] - row["refunded"]
    plan = config.plans.get(plan_name)
    if plan is None:
        allowed = left = "? (plan not in the plans file)"
    else:
        limit = plan.daily_limit + row["extra"]
        allowed, left = str(limit), str(max(0, limit - used))
    return [
        row["user_id"],
        shown_plan,
        str(used),
        str(row["granted"]),
        str(row["refunded"]),
        str(row["extra"]),
        allowed,
        left,
    ]


async def _accounts_grant(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    adjusted = await accounts.grant(
        pool, plans.load(settings.plans_file), args.user, args.images, getpass.getuser(), args.note
    )
    out.print(f"{args.user}: {adjusted.images:+d} images on {adjusted.day} ({adjusted.request_id})")
    return 0


async def _audit_replay(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    async with pool.acquire() as conn:
        report = await audit.replay(conn, args.user, args.since, args.partition)
    for mismatch in report.mismatches:
        out.print(f"NOT REPRODUCED {mismatch}")
    out.print(
        f"{report.events} events, {report.checked} decisions re-run, {len(report.mismatches)} not reproduced"
        + (f", {report.skipped} of an older policy skipped" if report.skipped else "")
    )
    return EXIT_FOUND_PROBLEMS if report.mismatches else 0


async def _audit_verify(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    signed, key = None, None
    if not args.no_checkpoints:
        try:
            key = checkpoints.public_key_from(args.public_key or settings.data_dir / checkpoints.PUBLIC_KEY_FILE)
            signed = (
                checkpoints.read_file(args.checkpoints) if args.checkpoints else await _stream_checkpoints(settings)
            )
        except (OSError, ValueError, nats.errors.Error) as error:
            err.print(f"kiln: cannot read quota's checkpoints ({error}); --no-checkpoints checks the chain alone")
            return EXIT_BAD_REQUEST
    async with pool.acquire() as conn:
        report = await audit.verify(conn, signed, key, args.partition)
    if report.broken:
        out.print(f"BROKEN: {report.broken[0]}")
        if len(report.broken) > 1:
            out.print(f"({len(report.broken) - 1} more problems after it)")
        source = str(args.checkpoints) if args.checkpoints else f"the {subjects.AUDIT_CHECKPOINTS.name} stream"
        note = checkpoints.new_log_note(report.checkpoints, source) if report.checkpoints else None
        if note:
            out.print(note)
        return EXIT_FOUND_PROBLEMS
    chains = "chain" if report.partitions == 1 else f"{report.partitions} partitions' chains"
    out.print(f"{chains} intact: {report.events} events")
    for partition, head in sorted(report.heads.items()):
        out.print(f"  partition {partition}: head {head} at position {report.last_positions[partition]}")
    if report.checkpoints is not None:
        newest = report.checkpoints.newest
        out.print(
            f"{report.checkpoints.checked} signed checkpoints match"
            + (f", the newest at position {newest.position} ({newest.when})" if newest else " (none yet)")
        )
    return 0


async def _stream_checkpoints(settings: Settings) -> list[checkpoints.Checkpoint]:
    """Every checkpoint the KILN_AUDIT_CHECKPOINTS stream keeps, read as an auditor that may
    read that stream and nothing else."""
    stream, subject = subjects.AUDIT_CHECKPOINTS, subjects.AUDIT_CHECKPOINT.subject()
    access = Access(streams=frozenset({stream.name}))
    credentials = settings.nats_creds
    if credentials is None and settings.nats_auth and Authority.exists(settings.data_dir):
        credentials = Authority.open(settings.data_dir).write_credentials(
            credentials_file(settings.data_dir, AUDITOR), AUDITOR, service_permissions(AUDITOR, access), 600
        )
    bus = await Bus.connect(
        settings.nats_address,
        AUDITOR,
        trace.get_tracer("kiln.audit"),
        access,
        credentials,
        connect_timeout=2,
        max_reconnect_attempts=1,
    )
    deadline = time.monotonic() + PUBLISH_RETRY_S
    try:
        while True:
            try:
                last = await bus.last_message(stream, subject)
                stored = await bus.read_subject(stream, subject, last.seq) if last else []
                break
            # A cluster that lost a node answers 503 while the stream elects a leader.
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await bus.close()
    return [checkpoints.decode(message.data) for message in stored]


async def _audit_export(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    async with pool.acquire() as conn:
        if args.output is None:
            count = await audit.export(conn, sys.stdout, args.user, args.since)
        else:
            with args.output.open("w") as file:
                count = await audit.export(conn, file, args.user, args.since)
    err.print(f"exported {count} events")
    if args.checkpoints is not None:
        try:
            signed = await _stream_checkpoints(settings)
        except (OSError, nats.errors.Error) as error:
            err.print(f"kiln: cannot read quota's checkpoints from NATS: {error}")
            return EXIT_BAD_REQUEST
        with args.checkpoints.open("wb") as file:
            written = audit.export_checkpoints(signed, file)
        err.print(f"exported {written} checkpoints to {args.checkpoints}")
    return 0


async def _audit_rebuild(args: argparse.Namespace, pool: asyncpg.Pool, settings: Settings) -> int:
    users = await audit.rebuild_projections(pool)
    out.print(f"usage and buckets rebuilt from the log for {users} users")
    return 0
