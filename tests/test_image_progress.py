"""Build progress as plain functions: pip's output in, counts and lines out (no Docker)."""

import zipfile

from bai_spawner.images.builder import unpacked_size
from bai_spawner.images.progress import DownloadMeter, Progress, install_detail, script_event, size_of

# Shape of `pip download --progress-bar raw` output (pip 26), shortened.
PIP_DOWNLOAD = """\
Looking in indexes: https://pypi.org/simple, file:///opt/pypi/simple
Looking in links: /opt/wheels
Processing /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
Collecting threadpoolctl==3.5.0
  Downloading threadpoolctl-3.5.0-py3-none-any.whl (18 kB)
Collecting mlflow-skinny==3.17.2
  Downloading mlflow_skinny-3.17.2-py3-none-any.whl (4.1 MB)
Progress 0 of 4110991
Progress 262144 of 4110991
Progress 4110991 of 4110991
Collecting filelock (from torch==2.13.0+cpu)
  Using cached filelock-4.3.1-py3-none-any.whl (244 kB)
Collecting big (from x)
  Downloading big-1.0-py3-none-any.whl (554.6 MB)
Progress 0 of 554581699
Progress 120000000 of 554581699
"""


def test_size_of_reads_pips_sizes():
    assert size_of("18 kB") == 18_000 and size_of("4.1 MB") == 4_100_000 and size_of("512 bytes") == 512
    assert size_of("1.2 GB") == 1_200_000_000 and size_of("soon") == 0


def test_download_meter_counts_packages_and_bytes_as_they_come():
    m = DownloadMeter()
    seen = []
    for line in PIP_DOWNLOAD.splitlines(keepends=True):
        if m.feed(line):
            seen.append((m.packages, m.fetched))
    # torch (a local file), threadpoolctl, mlflow-skinny, filelock, big
    assert m.packages == 5
    # the small file counts when the next one starts; the big one by its raw progress
    assert m.fetched == 18_000 + 4_110_991 + 244_000 + 120_000_000
    assert [f for _, f in seen] == sorted(f for _, f in seen), "never goes backwards"
    text = m.describe()
    assert text.startswith("5 packages, 124.4 MB fetched") and "big-1.0-py3-none-any.whl 120.0 of 554.6 MB" in text
    m.feed("Progress 554581699 of 554581699\n")  # pip always reports the end of a file
    m.close()
    assert m.fetched == 18_000 + 4_110_991 + 244_000 + 554_581_699 and "of" not in m.describe()


def test_download_meter_counts_a_retried_file_once():
    m = DownloadMeter()
    lines = ["Collecting a==1", "  Downloading a-1-py3-none-any.whl (3.0 MB)", "Progress 1500000 of 3000000",
             "  WARNING: Attempting to resume incomplete download (1.5 MB/3.0 MB, attempt 1)",
             "  Downloading a-1-py3-none-any.whl (3.0 MB)", "Progress 262144 of 3000000"]
    for line in lines:
        m.feed(line)
    assert (m.packages, m.fetched) == (1, 262144)
    m.close()
    assert m.fetched == 262144  # it stopped there


def test_download_meter_without_raw_progress_counts_whole_files():
    m = DownloadMeter()
    for line in ["Collecting a==1\n", "  Downloading a-1-py3-none-any.whl (8.4 MB)\n", "Saved ./a-1.whl\n"]:
        m.feed(line)
    assert m.fetched == 0
    m.close()
    assert (m.packages, m.fetched) == (1, 8_400_000)


def test_script_lines_and_install_detail():
    assert script_event("[bai] step install kernel") == ("step", "install kernel", None)
    assert script_event("[bai] step compile\n") == ("step", "compile", None)
    assert script_event("[bai] bytes kernel 1048576") == ("bytes", "kernel", 1048576)
    assert script_event("Processing /tmp/.bai-build/wheels/kernel/x.whl") is None
    assert script_event("[bai] done") is None
    assert install_detail("kernel", 812_000_000, 1_303_500_000) == "kernel environment 812.0 of 1303.5 MB (62%)"
    # pip writes a little more than the wheels hold (RECORD, INSTALLER): never past 99 % before the end
    assert install_detail("kernel", 2_000_000, 1_000_000) == "kernel environment 1.0 of 1.0 MB (99%)"
    assert install_detail("server", 5_000_000, 0) == "server environment 5.0 MB"


def test_progress_line_names_image_position_and_step():
    p = Progress(2, 3, "bai/sklearn:1.6.1", "install", "kernel environment 1.0 of 2.0 MB (50%)", 1, 2, "bytes")
    assert str(p) == "[2/3] bai/sklearn:1.6.1: install: kernel environment 1.0 of 2.0 MB (50%)"
    assert str(Progress(1, 3, "bai/base:bookworm", "commit")) == "[1/3] bai/base:bookworm: commit"


def test_unpacked_size_counts_each_wheel_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):
        with zipfile.ZipFile(d / "x-1-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x/__init__.py", "0" * 1000)
    with zipfile.ZipFile(b / "y-1-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("y.py", "1" * 500)
    assert unpacked_size([a, b]) == 1500 and unpacked_size([]) == 0
