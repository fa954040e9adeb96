"""The AsyncAPI document: complete, self-contained, stable, and the checked-in copy current.

Most tests use a small hand-made set of declarations shaped like the real ones, so they run
without importing the services (render's imports torch).
"""

from contextlib import asynccontextmanager
from typing import Any

import pytest
import yaml

from infra import asyncapi
from infra.asyncapi import channel_id, document, real_declarations, to_yaml
from shared import subjects
from shared.access import Access
from shared.bus import Message
from shared.consuming import Received
from shared.events import (
    ID_PATTERN,
    TERMINAL,
    ImageDelivered,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    RenderCompleted,
    RenderFailed,
    RenderRequested,
    RequestFailed,
)
from shared.service import Answer, Consume, Listen, Service
from shared.subjects import ALL_CHANNELS


class _App:
    """Handlers whose annotations say what each consumer accepts (as `Consume` reads them)."""

    async def take_prompts(self, batch: list[Received[PromptSubmitted]]) -> None: ...
    async def take_outcome(self, outcome: QuotaDenied | ImageDelivered | RequestFailed) -> None: ...
    async def take_decision(self, event: QuotaGranted | QuotaDenied) -> None: ...
    async def take_job(self, job: RenderRequested) -> None: ...
    async def take_render_event(self, event: RenderCompleted | RenderFailed) -> None: ...
    async def answer(self, subject: str) -> dict: ...
    async def hear(self, message: Message) -> None: ...


@asynccontextmanager
async def _open(settings: Any, bus: Any):
    yield _App()


SERVICES = [
    Service(
        name="quota",
        open=_open,
        consumes=(
            Consume(subjects.PROMPTS, "quota", _App.take_prompts),
            Consume(subjects.OUTCOMES, "quota-refunds", _App.take_outcome),
        ),
        answers=(Answer(subjects.QUOTA_STATUS, _App.answer), Answer(subjects.QUOTA_PRESSURE, _App.answer)),
        listens=(Listen(subjects.FLEET_TELEMETRY, _App.hear),),
        publishes=(subjects.QUOTA_DECIDED, subjects.OUTCOME),
        reads=(subjects.OUTCOMES,),
    ),
    Service(
        name="context",
        open=_open,
        consumes=(Consume(subjects.QUOTA, "context", _App.take_decision),),
        answers=(Answer(subjects.CONTEXT_STYLES, _App.answer),),
        publishes=(subjects.RENDER_JOB, subjects.CONVERSATION, subjects.OUTCOME),
        reads=(subjects.OUTCOMES, subjects.CONVERSATIONS),
    ),
    Service(
        name="render",
        open=_open,
        consumes=(Consume(subjects.RENDER_JOBS, "render", _App.take_job),),
        publishes=(subjects.RENDER_EVENT, subjects.RENDER_PROGRESS, subjects.FLEET_TELEMETRY, subjects.OUTCOME),
        reads=(subjects.RENDER_CANCELS,),
        buckets=(subjects.IMAGES, subjects.RENDER_ATTEMPTS),
    ),
    Service(
        name="delivery",
        open=_open,
        consumes=(Consume(subjects.RENDER_EVENTS, "delivery", _App.take_render_event),),
        publishes=(subjects.OUTCOME, subjects.PROMPT_SUBMITTED, subjects.QUOTA_STATUS),
        hears=(subjects.RENDER_PROGRESS, subjects.OUTCOME),
        buckets=(subjects.IMAGES, subjects.IMAGE_RECORDS),
    ),
]
CLIENT = Access(
    publish=frozenset({"kiln.prompt.submitted.*", "kiln.render.cancel.*.*", "kiln.quota.status.*"}),
    subscribe=frozenset({"kiln.render.progress.*.*", "kiln.outcome.*.*"}),
    streams=frozenset({"KILN_OUTCOMES"}),
    buckets=frozenset({"kiln-images"}),
)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(SERVICES, CLIENT)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (no {part!r})"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _operations_on(doc: dict[str, Any], channel: subjects.Channel, tag: str, action: str) -> list[dict[str, Any]]:
    ref = f"#/channels/{channel_id(channel)}"
    return [
        op
        for op in doc["operations"].values()
        if op["channel"]["$ref"] == ref and op["action"] == action and op["tags"] == [{"name": tag}]
    ]


def _message_names(operation: dict[str, Any]) -> list[str]:
    return [ref["$ref"].rsplit("/", 1)[1] for ref in operation["messages"]]


def test_it_is_an_asyncapi_3_document(doc):
    assert doc["asyncapi"] == "3.0.0"
    assert {"info", "channels", "operations", "components"} <= doc.keys()
    assert doc["info"]["title"] == "Kiln" and doc["info"]["version"]
    assert doc["servers"]["nats"] == {
        "host": "127.0.0.1:14222",
        "protocol": "nats",
        "description": doc["servers"]["nats"]["description"],
    }
    assert all(op["action"] in ("send", "receive") for op in doc["operations"].values())
    for key in (*doc["channels"], *doc["operations"], *doc["components"]["messages"], *doc["components"]["schemas"]):
        assert key.replace(".", "").replace("-", "").replace("_", "").isalnum(), key


def test_the_description_says_which_events_end_a_request(doc):
    description = doc["info"]["description"]
    assert all(f"`{event.__name__}`" in description for event in TERMINAL)
    assert subjects.OUTCOME.template in description
    ending = {name for name, message in doc["components"]["messages"].items() if message.get("x-kiln-ends-request")}
    assert ending == {event.__name__ for event in TERMINAL}


def test_every_channel_is_there_with_its_parameters(doc):
    for channel in ALL_CHANNELS:
        described = doc["channels"][channel_id(channel)]
        assert described["address"] == channel.template
        assert list(described.get("parameters", {})) == channel.tokens
        for token in {"user", "request", "conversation"} & set(channel.tokens):
            assert ID_PATTERN.pattern in described["parameters"][token]["description"]
    assert doc["channels"]["renderJobs"]["parameters"]["tier"]["enum"] == list(subjects.TIERS)
    assert doc["channels"]["outcome"]["parameters"]["request"]["location"] == "$message.payload#/request_id"
    assert "location" not in doc["channels"]["renderCancel"]["parameters"]["user"]  # an empty payload


def test_channels_say_where_they_are_kept_and_what_headers_they_need(doc):
    for channel in ALL_CHANNELS:
        described = doc["channels"][channel_id(channel)]
        stream = subjects.stream_of(channel)
        if stream is None:
            assert "not kept" in described["description"] and "x-kiln-stream" not in described
        else:
            assert described["x-kiln-stream"]["name"] == stream.name
            assert stream.name in described["description"]
    assert doc["channels"]["renderJobs"]["x-kiln-stream"]["retention"] == "workqueue"
    prompt = doc["channels"]["promptSubmitted"]
    assert prompt["x-kiln-headers"] == {"Nats-Msg-Id": "<user>:<request>:prompt-submitted"}
    assert doc["channels"]["outcome"]["x-kiln-headers"]["Nats-Expected-Last-Subject-Sequence"].startswith("0")


def test_every_event_is_a_message_with_its_schema(doc):
    components = doc["components"]
    for channel in ALL_CHANNELS:
        for event in channel.events:
            message = components["messages"][event.__name__]
            assert message["payload"] == {"$ref": f"#/components/schemas/{event.__name__}"}
            assert message["contentType"] == "application/json"
            headers = _resolve(doc, message["headers"]["$ref"])["properties"]
            assert {"Nats-Msg-Id", "traceparent", "Content-Type"} <= headers.keys()
        if channel.reply is not None:
            assert f"{channel_id(channel)}Reply" in doc["channels"]
    assert components["schemas"]["AnyEvent"]["discriminator"] == "type"  # AsyncAPI's form: the property


def test_an_operation_per_declared_publish_consume_answer_and_listen(doc):
    for service in SERVICES:
        for channel in service.publishes:
            assert _operations_on(doc, channel, service.name, "send"), (service.name, channel.template)
        for consume in service.consumes:
            (operation,) = [
                op
                for op in _operations_on(doc, consume.stream.channel, service.name, "receive")
                if "x-kiln-consumer" in op
            ]
            assert _message_names(operation) == [kind.__name__ for kind in consume.accepts]
            assert operation["x-kiln-consumer"]["durable"] == consume.durable
        for answer in service.answers:
            (operation,) = _operations_on(doc, answer.channel, service.name, "receive")
            assert operation["reply"]["channel"] == {"$ref": f"#/channels/{channel_id(answer.channel)}Reply"}
            assert operation["bindings"]["nats"]["queue"] == service.name
        for listen in service.listens:
            assert _operations_on(doc, listen.channel, service.name, "receive")
        if service.consumes:
            assert _operations_on(doc, subjects.DEAD_LETTER, service.name, "send")
    assert doc["operations"]["quota.consume.promptSubmitted"]["x-kiln-consumer"]["batched"] is True


def test_the_client_sends_prompts_and_cancels_and_hears_progress_and_outcomes(doc):
    for channel in (subjects.PROMPT_SUBMITTED, subjects.RENDER_CANCEL, subjects.QUOTA_STATUS):
        assert _operations_on(doc, channel, "client", "send")
    for channel in (subjects.RENDER_PROGRESS, subjects.OUTCOME):
        assert _operations_on(doc, channel, "client", "receive")
    assert "reply" in doc["operations"]["client.request.quotaStatus"]
    assert "client.read.outcome" in doc["operations"]  # the recorded outcome, from KILN_OUTCOMES
    assert not _operations_on(doc, subjects.RENDER_JOB, "client", "send")
    images = next(bucket for bucket in doc["x-kiln-buckets"] if bucket["name"] == subjects.IMAGES.name)
    assert images["usedBy"] == ["client", "delivery", "render"]


def test_every_ref_resolves_inside_the_document(doc):
    refs = _refs(doc)
    assert refs
    for ref in refs:
        _resolve(doc, ref)


def test_operations_name_only_messages_of_their_channel(doc):
    for name, operation in doc["operations"].items():
        channel = operation["channel"]["$ref"]
        assert all(ref["$ref"].startswith(channel + "/messages/") for ref in operation["messages"]), name
        reply = operation.get("reply")
        if reply:
            assert all(ref["$ref"].startswith(reply["channel"]["$ref"] + "/messages/") for ref in reply["messages"])


def test_the_yaml_is_stable_and_reads_back_as_the_document(doc):
    text = to_yaml(doc)
    assert text == to_yaml(document(SERVICES, CLIENT))
    assert yaml.safe_load(text) == doc
    assert "&id" not in text and "*id" not in text  # no anchors: every object written where it is used


def test_a_client_subject_no_channel_describes_is_refused():
    with pytest.raises(ValueError, match="kiln.secret"):
        document(SERVICES, Access(publish=frozenset({"kiln.secret.*"})))


def test_a_consumer_of_an_event_its_stream_does_not_carry_is_refused():
    wrong = Service(name="lost", open=_open, consumes=(Consume(subjects.PROMPTS, "lost", _App.take_job),))
    with pytest.raises(ValueError, match="RenderRequested"):
        document([wrong], None)


def test_check_fails_with_one_line_when_the_file_is_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(asyncapi, "real_declarations", lambda: (SERVICES, CLIENT))
    output = tmp_path / "asyncapi.yaml"
    assert asyncapi.main(["--check", "--output", str(output)]) == 1  # missing
    assert asyncapi.main(["--output", str(output)]) == 0
    assert asyncapi.main(["--check", "--output", str(output)]) == 0
    output.write_text(output.read_text() + "# edited\n")
    capsys.readouterr()
    assert asyncapi.main(["--check", "--output", str(output)]) == 1
    assert capsys.readouterr().err == f"{output} is out of date: run make asyncapi\n"


def test_the_checked_in_document_is_current():
    services, client = real_declarations()
    assert asyncapi.OUTPUT.exists(), "docs/asyncapi.yaml is missing: run make asyncapi"
    assert asyncapi.OUTPUT.read_text(encoding="utf-8") == to_yaml(document(services, client)), (
        "docs/asyncapi.yaml is out of date: run make asyncapi"
    )
