from services.render.pipeline import batch_key
from shared.events import RenderRequested


def job(**fields):
    base = dict(request_id="r", user_id="u", prompt="a red circle", width=32, height=32, steps=20, seed=1)
    return RenderRequested(**(base | fields))


def test_jobs_batch_together_only_when_mode_size_and_steps_agree():
    assert batch_key(job()) == batch_key(job(prompt="a blue square", seed=9, tier="paid"))
    assert batch_key(job()) != batch_key(job(steps=10))
    assert batch_key(job()) != batch_key(job(width=64))
    assert batch_key(job()) != batch_key(job(mode="edit", source_key="u/x.png"))
    edit = job(mode="edit", source_key="u/x.png")
    assert batch_key(edit) != batch_key(job(mode="edit", source_key="u/x.png", strength=0.5))


def test_jobs_with_text_batch_together_and_apart_from_pictures_without():
    sign = job(width=128, height=128, text="OPEN")
    assert batch_key(sign) == batch_key(job(width=128, height=128, text="SALE", prompt="the word"))
    assert batch_key(sign) != batch_key(job(width=128, height=128))
