import random

from services.render.kiln_model import check, scenes


def test_prompts_are_read_the_way_captions_are_written():
    assert scenes.parse("a red circle on a blue background at the top") == scenes.Scene("circle", "red", "blue", "top")
    assert scenes.parse("the digit 7 in green on white") == scenes.Scene("7", "green", "white", "center")
    assert scenes.parse("please draw a yellow triangle, kthx") == scenes.Scene("triangle", "yellow", None, "center")
    assert scenes.parse("nothing to draw") is None


def test_captions_describe_the_scene_they_were_written_for():
    rng = random.Random(3)
    for _ in range(200):
        scene = scenes.random_scene(rng)
        text, described = scenes.caption(scene, rng)
        parsed = scenes.parse(text)
        assert parsed == described, text


def test_held_out_scenes_are_sixty_distinct_scenes():
    held_out = scenes.held_out_scenes()
    assert len(held_out) == 60 and len(set(held_out)) == 60
    assert sum(s.is_glyph for s in held_out) == 20


def test_the_checker_reads_clean_drawings_right():
    # The checker judges the model, so it must first be right about the pictures the model
    # learns from: every attribute of the 60 held-out scenes, drawn without jitter.
    pairs = [(scene, check.read(scenes.draw(scene))) for scene in scenes.held_out_scenes()]
    assert check.score(pairs) == {name: 1.0 for name in check.TARGETS}


def test_the_checker_is_not_fooled_by_a_wrong_picture():
    asked = scenes.Scene("circle", "red", "blue", "top")
    drawn = scenes.draw(scenes.Scene("square", "green", "white", "left"))
    scores = check.score([(asked, check.read(drawn))])
    assert [scores[name] for name in ("colour", "shape", "position", "background")] == [0.0] * 4


def test_the_checker_tells_digits_apart():
    asked = scenes.Scene("7", "red", "blue", "center")
    assert check.read(scenes.draw(scenes.Scene("1", "red", "blue", "center"))).glyph == "1"
    assert check.score([(asked, check.read(scenes.draw(asked)))])["digit"] == 1.0
