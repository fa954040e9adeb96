"""The context application: a granted prompt → the conversation's next turn → one render job.

For each grant: check the deployment's limits and blocklist; read the conversation; if this
request's turn is recorded already (a redelivery), use it; else resolve the edit and the
style, compose (refusing what the model cannot draw: its card's vocabulary), and append the
turn, expecting the conversation to end where it was read (another context process may have
appended meanwhile: then read and compose again). Then publish the render job. A refusal
ends the request as RequestFailed(stage="context").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from opentelemetry import metrics

from services.context import config as context_config
from services.context.compose import (
    Refusal,
    TextModel,
    check_submission,
    compose,
    render_request,
    style_in_force,
    wants_latest_image,
)
from shared import model_card, subjects
from shared.bus import Bus
from shared.events import (
    LAST_IMAGE,
    Composition,
    ImageDelivered,
    QuotaDenied,
    QuotaGranted,
    RequestFailed,
    TurnComposed,
)
from shared.records import read_outcome, read_turns
from shared.service import CannotStart
from shared.settings import Settings

log = logging.getLogger("kiln.context")
turns = metrics.get_meter("kiln.context").create_counter(
    "kiln_context_turns", description="Prompts composed (new pictures, edits) or refused, with the reason"
)

MAX_APPEND_TRIES = 8  # another turn of the same conversation composed meanwhile: compose again
LATEST_IMAGE_LOOKBACK = 20  # turns searched, newest first, for "the last one"


class Context:
    def __init__(
        self,
        bus: Bus,
        config: context_config.Config,
        vocabulary: model_card.Vocabulary | None = None,
        text_model: TextModel | None = None,
    ) -> None:
        self.bus = bus
        self.config = config
        self.vocabulary = vocabulary  # what the model draws; None: anything
        self.text_model = text_model  # the model that draws quoted text; None: quotes are words

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, bus: Bus) -> AsyncIterator[Context]:
        try:
            config = context_config.load(settings.context_config)
        except context_config.ConfigError as error:
            raise CannotStart(f"cannot read its config: {error}") from error
        try:
            card = model_card.load(settings.model_path)
            text_model = TextModel.of(model_card.text_card(settings.model_path))
        except model_card.CardError as error:
            raise CannotStart(f"cannot read the model card: {error}") from error
        yield cls(bus, config, card.vocabulary, text_model)

    async def handle_decision(self, event: QuotaGranted | QuotaDenied) -> None:
        if isinstance(event, QuotaDenied):
            return  # a denial ends the request at quota; nothing to render
        if await self.bus.outcome_recorded(event.user_id, event.request_id):
            return  # ended already (given up on while we were behind): render nothing
        with self.bus.tracer.start_as_current_span("context compose") as span:
            try:
                composition, prompt = await self.turn(event)
            except Refusal as refusal:  # the user's answer, not the service's failure
                span.set_attribute("kiln.refusal", refusal.reason)
                await self.refuse(event, refusal)
                return
            span.set_attributes(
                {
                    "kiln.style": composition.style,
                    "kiln.edit_of": composition.edit_of or "",
                    "kiln.conversation": bool(event.conversation_id),
                }
            )
        turns.add(1, {"kind": "edit" if composition.edit_of else "new"})
        job = render_request(event, composition, prompt, self.config, self.text_model)
        # The job subject is shared by all requests of a user's tier, so duplicates are caught
        # by message id within the window; past it, render finds the stored image or outcome.
        await self.bus.publish(
            subjects.render_job(job.tier, job.user_id), job, msg_id=f"{job.user_id}:{job.request_id}:render-requested"
        )

    async def refuse(self, grant: QuotaGranted, refusal: Refusal) -> None:
        turns.add(1, {"kind": "refused", "reason": refusal.reason})
        log.info("refused %s/%s: %s", grant.user_id, grant.request_id, refusal)
        failed = RequestFailed(
            request_id=grant.request_id,
            user_id=grant.user_id,
            conversation_id=grant.conversation_id,
            stage="context",
            reason=refusal.reason,
            detail=refusal.detail,
            plan=grant.plan,
        )
        await self.bus.publish(subjects.outcome(grant.user_id, grant.request_id), failed, first_on_subject=True)

    async def turn(self, grant: QuotaGranted) -> tuple[Composition, str]:
        """Compose the request and record it as the conversation's next turn. Appending
        expects the conversation to end where it was read; if another turn came first, read
        and compose again (the new turn may change what "the last one" is)."""
        check_submission(grant.submission, self.config)
        if not grant.conversation_id:
            return await self.compose(grant, [])
        for _ in range(MAX_APPEND_TRIES):
            turns, last_seq = await read_turns(self.bus, grant.user_id, grant.conversation_id)
            for turn in turns:
                if turn.request_id == grant.request_id:
                    return turn.composition, turn.prompt  # composed before (a redelivery)
            if len(turns) >= self.config.limits.max_turns:
                raise Refusal("conversation_full", f"this conversation has {len(turns)} turns; start a new one")
            composition, prompt = await self.compose(grant, turns)
            recorded = TurnComposed(
                request_id=grant.request_id,
                user_id=grant.user_id,
                conversation_id=grant.conversation_id,
                prompt=prompt,
                composition=composition,
            )
            subject = subjects.conversation(grant.user_id, grant.conversation_id)
            if await self.bus.publish(subject, recorded, after_seq=last_seq):
                return composition, prompt
            log.info(
                "conversation %s gained a turn while composing %s; composing again",
                grant.conversation_id,
                grant.request_id,
            )
        raise RuntimeError(f"conversation {grant.conversation_id} kept changing while composing")  # retried by the bus

    async def compose(self, grant: QuotaGranted, turns: list[TurnComposed]) -> tuple[Composition, str]:
        submission = grant.submission
        style = style_in_force(submission, turns, self.config)
        source = None
        if wants_latest_image(submission, in_conversation=bool(turns)):
            source = await self.latest_image(grant, turns)
            if source is None and submission.edit_of == LAST_IMAGE:
                raise Refusal("nothing_to_edit", "this conversation has no image to edit yet")
        elif submission.edit_of is not None:
            source = await self.image(grant.user_id, submission.edit_of)
            if source is None:
                raise Refusal("no_such_image", f"you have no image from request {submission.edit_of}")
        return compose(grant, style, self.config, source, self.vocabulary, self.text_model)

    async def latest_image(self, grant: QuotaGranted, turns: list[TurnComposed]) -> tuple[str, Composition] | None:
        """The newest image of the conversation. If the newest turn is still being drawn,
        the user means that one: refuse rather than edit an older image."""
        for turn in reversed(turns[-LATEST_IMAGE_LOOKBACK:]):
            outcome = await read_outcome(self.bus, grant.user_id, turn.request_id)
            if outcome is None and turn is turns[-1]:
                raise Refusal("still_drawing", "the last image is still being drawn; ask again once it is there")
            if isinstance(outcome, ImageDelivered):
                return turn.request_id, _composition(outcome)
        return None

    async def image(self, user_id: str, request_id: str) -> tuple[str, Composition] | None:
        """The user's image from that request, with what it shows; None if it has none."""
        outcome = await read_outcome(self.bus, user_id, request_id)
        if not isinstance(outcome, ImageDelivered):
            return None
        return request_id, _composition(outcome)

    async def answer_turns(self, subject: str) -> list[TurnComposed]:
        """The answer to `kiln.context.turns.<user>.<conversation>`: its turns, oldest first."""
        user_id = subjects.CONTEXT_TURNS.value(subject, "user")
        conversation_id = subjects.CONTEXT_TURNS.value(subject, "conversation")
        turns, _ = await read_turns(self.bus, user_id, conversation_id)
        return turns

    async def answer_styles(self, subject: str) -> dict[str, str]:
        """The answer to `kiln.context.styles`: the style presets, name → title."""
        return {name: style.title for name, style in self.config.styles.items()}


def _composition(delivered: ImageDelivered) -> Composition:
    """What a delivered image shows (an image from before compositions: its prompt)."""
    return delivered.composition or Composition(text=delivered.prompt, subject=delivered.prompt)
