"""How far a pull or push has come, from the engine's own progress events (recorded from Docker
20.10 pulling from and pushing to Debian's docker-registry)."""
import pytest

from bai_scheduler.contract.transfer import Transfer, TransferFailed, format_size, short_id

A = "sha256:485687a0555ad2a212accd78a4a5673f01d5f13b9021f8d427dd6a85da6ded82"
B = "sha256:530c6611648cee0e872e8e61d30380b773a38e04acc04307ee0fdb5578120f8d"
C = "sha256:f32a37c27ac47f37fa470402012e20d907e8ff1a543918e7a11a4b180188b6b8"
MANIFEST = [(A, 110_560_380), (B, 372_543_703), (C, 140_199_565)]


def ev(status, layer="", current=None, total=None):
    out = {"status": status}
    if layer:
        out["id"] = layer
    out["progressDetail"] = {"current": current, "total": total} if total else {}
    return out


def test_a_pull_counts_every_layer_of_the_manifest_from_the_start():
    t = Transfer(MANIFEST)
    assert not t.feed(ev("Pulling from bai/sklearn", "1.6.1"))  # the tag, not a layer
    assert t.total_bytes == 623_303_648 and t.done_bytes == 0
    assert t.describe() == "0 B of 623.3 MB"
    t.feed(ev("Already exists", short_id(A)))
    t.feed(ev("Pulling fs layer", short_id(B)))
    t.feed(ev("Pulling fs layer", short_id(C)))
    assert t.done_bytes == 110_560_380 and t.finished == {short_id(A)}
    assert t.feed(ev("Downloading", short_id(B), 200_000_000, 372_543_703))
    assert t.describe() == "310.6 MB of 623.3 MB"
    t.feed(ev("Download complete", short_id(B)))
    t.feed(ev("Downloading", short_id(C), 140_199_565, 140_199_565))
    t.feed(ev("Verifying Checksum", short_id(C)))
    assert t.done_bytes == t.total_bytes
    t.feed(ev("Extracting", short_id(B), 1_000, 372_543_703))
    assert t.describe() == "623.3 MB of 623.3 MB, unpacking layer 2 of 3"
    t.feed(ev("Pull complete", short_id(B)))
    t.feed(ev("Pull complete", short_id(C)))
    assert t.finished == {short_id(A), short_id(B), short_id(C)} and t.layers == 3
    assert not t.feed(ev("Digest: sha256:2f3c52f1"))
    assert not t.feed(ev("Status: Downloaded newer image for 127.0.0.1:5000/bai/sklearn:1.6.1"))


def test_a_repeated_event_changes_nothing():
    t = Transfer(MANIFEST)
    assert t.feed(ev("Downloading", short_id(B), 5, 372_543_703))
    assert not t.feed(ev("Downloading", short_id(B), 5, 372_543_703))


def test_a_push_counts_the_bytes_it_sends_and_the_layers_already_there():
    t = Transfer()
    t.feed(ev("The push refers to repository [127.0.0.1:5000/bai-private/alice]"))
    for layer in ("1f4cb1793d6c", "6e0d7a12b554", "23f6d06011d0"):
        t.feed(ev("Preparing", layer))
    t.feed(ev("Mounted from bai/sklearn", "6e0d7a12b554"))
    t.feed(ev("Layer already exists", "23f6d06011d0"))
    t.feed(ev("Pushing", "1f4cb1793d6c", 512, 12_813))
    assert t.done_bytes == 512 and t.total_bytes == 12_813
    t.feed(ev("Pushing", "1f4cb1793d6c", 15_360, 12_813))  # the engine counts past its total
    assert t.done_bytes == 12_813
    assert t.describe_push() == "2 of 3 layers, 12.8 kB of 12.8 kB sent"
    t.feed(ev("Pushed", "1f4cb1793d6c"))
    assert len(t.finished) == 3 and t.describe() == "12.8 kB of 12.8 kB"
    assert Transfer().describe_push() == "0 of 0 layers"


@pytest.mark.parametrize("event", [
    {"errorDetail": {"message": "manifest unknown"}, "error": "manifest unknown"},
    {"error": "manifest unknown"},
    {"errorDetail": {"message": "manifest unknown"}},
])
def test_an_error_event_says_why(event):
    with pytest.raises(TransferFailed, match="manifest unknown"):
        Transfer(MANIFEST).feed(event)


def test_sizes():
    assert [format_size(n) for n in (0, 999, 1_000, 1_234_567, 3_400_000_000)] == \
        ["0 B", "999 B", "1.0 kB", "1.2 MB", "3.4 GB"]
