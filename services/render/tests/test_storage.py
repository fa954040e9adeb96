import io
import json

import nats.js.errors
import pytest
from opentelemetry import trace
from PIL import Image

from services.render import storage
from services.render.storage import BadInput, ImageStore, check_job

from .jobs import held, job


class Info:
    def __init__(self, description: str | None) -> None:
        self.description = description


class Stored:
    def __init__(self, data: bytes) -> None:
        self.data = data


class ObjectStore:
    def __init__(self, **objects: bytes) -> None:
        self.objects = {key.replace("__", "/"): value for key, value in objects.items()}
        self.meta: dict[str, str | None] = {}

    async def get(self, key: str) -> Stored:
        if key not in self.objects:
            raise nats.js.errors.ObjectNotFoundError
        return Stored(self.objects[key])

    async def get_info(self, key: str) -> Info:
        if key not in self.objects:
            raise nats.js.errors.ObjectNotFoundError
        return Info(self.meta.get(key))

    async def put(self, key: str, data: bytes, meta=None) -> None:
        self.objects[key] = data
        self.meta[key] = meta.description


def png(width: int = 8, height: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def images(**objects: bytes) -> ImageStore:
    return ImageStore(ObjectStore(**objects), trace.NoOpTracer())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (dict(width=4096), "4096×32 is outside"),
        (dict(height=4), "32×4 is outside"),
        (dict(steps=0), "0 steps is outside 1..50"),
        (dict(steps=51), "51 steps"),
        (dict(mode="edit", source_key="bob/r0.png"), "is not alice's"),
    ],
)
def test_a_job_outside_the_limits_or_editing_anothers_image_is_refused(fields, says):
    with pytest.raises(BadInput, match=says):
        check_job(job(**fields), max_side=1024, max_steps=50)
    check_job(job(mode="edit", source_key="alice/r0.png"), max_side=1024, max_steps=50)


async def test_an_edit_loads_its_source_and_an_inpainting_its_mask_too():
    store = images(alice__r0=png(), alice__mask=png())
    assert await store.inputs(job(), 1024, 50) == (None, None)
    source, mask = await store.inputs(job(mode="edit", source_key="alice/r0"), 1024, 50)
    assert source.size == (8, 8) and mask is None
    source, mask = await store.inputs(job(mode="inpaint", source_key="alice/r0", mask_key="alice/mask"), 1024, 50)
    assert source.size == mask.size == (8, 8)


async def test_a_missing_unreadable_or_huge_input_is_bad(monkeypatch):
    store = images(alice__junk=b"not a png", alice__big=png(20, 20))
    with pytest.raises(BadInput, match="no stored image 'alice/gone' to edit"):
        await store.image("alice/gone")
    with pytest.raises(BadInput, match="'alice/junk' is not an image"):
        await store.image("alice/junk")
    monkeypatch.setattr(storage, "MAX_INPUT_PIXELS", 399)
    with pytest.raises(BadInput, match="'alice/big' is 20×20, larger than an input may be"):
        await store.image("alice/big")


async def test_a_stored_image_keeps_its_render_time_for_a_redelivery():
    store = images()
    item = held("r1")
    assert await store.stored_render_ms(item.event) is None
    await store.put(item, png(), render_ms=1234.5, batch_size=3)
    assert json.loads(store.store.meta["alice/r1.png"]) == {"render_ms": 1234.5, "batch": 3}
    assert await store.stored_render_ms(item.event) == 1234.5
    assert await store.stored_render_ms(job("r1", "bob")) is None  # bob's r1 is another request
