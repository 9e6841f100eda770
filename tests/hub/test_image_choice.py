"""The image that runs is the image allowed.

A spawn names its image in up to three places: the form's picker (``image``), the
typed name (``image_name``, which wins when given) and, through the REST API, any
raw ``user_options``. Whatever the combination, the container is made from the
one reference that passed the catalog check, or nothing is made. Checked on the
engine (``docker inspect``), in the scheduler's request and the hub's record, and
on the sessions page; here through the REST API, in Debian's chromium in
tests/browser/test_pages_browser.py.

The values: two catalog images (one named by its full id), another user's private
image (by name and by id prefix), an image on the engine that is not in the
catalog (by name, by id and by a short id), and nothing.
"""
from __future__ import annotations

import pytest

from helpers import KERNEL_IMAGE, OLD_IMAGE
from helpers.registry import reference
from helpers.images import SHAPE, assert_refused, assert_runs, chosen, choice_images, stop

pytestmark = [pytest.mark.docker, pytest.mark.hub]

GIB = 1024**3
NAMES = ["catalog", "catalog-by-id", "private", "private-id-prefix", "not-in-catalog", "not-in-catalog-id",
         "not-in-catalog-short-id", "nothing"]


@pytest.fixture(scope="module")
def values(hub, kernel_images):
    with choice_images(hub) as v:
        yield v


def options(values, picker: str, typed: str) -> dict:
    out = dict(SHAPE)
    if values[picker][0]:
        out["image"] = values[picker][0]
    if values[typed][0]:
        out["image_name"] = values[typed][0]
    return out


@pytest.mark.slow
def test_every_picker_and_typed_name_runs_the_validated_image_or_nothing(hub, users, values):
    name, token = users("combo")
    combos = [(f"c{i}{j}", picker, typed) for i, picker in enumerate(NAMES) for j, typed in enumerate(NAMES)]
    allowed = [c for c in combos if chosen(values, c[1], c[2])]
    assert (len(allowed), len(combos) - len(allowed)) == (19, 45)
    starting = []
    for n, (server, picker, typed) in enumerate(combos):
        body = options(values, picker, typed)
        if n % 2:  # JupyterHub's documented form of the body; the bare form otherwise
            body = {"user_options": body}
        r = hub.start_server(name, server, body, token=token)
        if chosen(values, picker, typed) is None:
            assert_refused(hub, name, server, r)
            continue
        assert r.status_code in (201, 202), (picker, typed, r.text)
        starting.append((server, chosen(values, picker, typed)))
        if len(starting) == 4 or (server, picker, typed) == allowed[-1]:
            # A few sessions at a time (a 2-core machine): check each, then stop them.
            for s, ref in starting:
                assert_runs(hub, name, s, ref)
            for s, _ in starting:
                stop(hub, name, s)
            starting.clear()


def test_raw_user_options_cannot_replace_the_validated_image(hub, users, values):
    """Already-parsed options (what a restart or api/launch sends) name one image, and
    cannot be mixed with the form's fields to sneak in another."""
    name, token = users("raw")
    parsed = {"quanta": 0, "cpu_millis": 500, "memory_bytes": GIB, "sessions": 1}
    cases = [
        ({"image": values["private"][0], "image_name": KERNEL_IMAGE, **parsed}, None),
        ({"image": KERNEL_IMAGE, "image_name": values["private"][0], **parsed}, None),
        ({"image": values["not-in-catalog"][0], **parsed}, None),
        ({"image": values["private-id-prefix"][0], **parsed}, None),
        ({"image": KERNEL_IMAGE, "fgpu": "0", **parsed}, None),
        ({"image": f" {OLD_IMAGE}\n", **parsed}, OLD_IMAGE),
        ({"image": values["catalog-by-id"][0], **parsed}, OLD_IMAGE),
        # What the hub's record keeps (and a restart sends): the registry's reference of the image.
        ({"image": reference(OLD_IMAGE), **parsed}, OLD_IMAGE),
        # The same name in another registry is not the image the catalog allows.
        ({"image": f"registry.invalid:5000/{OLD_IMAGE}", **parsed}, None),
        ({"image": f"  {values['private'][0]}  ", "image_name": f"\t{OLD_IMAGE} ", **SHAPE}, OLD_IMAGE),
    ]
    for i, (body, want) in enumerate(cases):
        server = f"r{i}"
        r = hub.start_server(name, server, body, token=token)
        if want is None:
            assert_refused(hub, name, server, r)
        else:
            assert r.status_code in (201, 202), (body, r.text)
            assert_runs(hub, name, server, want)
            stop(hub, name, server)
