"""Pre-flight in worker processes (``run.preflight_pool: process``, the default): the same bytes, report and
errors as pre-flight in this process; a dead worker fails only its row; no worker outlives the loader."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.core.config import ImagesConfig, config_from_dict
from pipeline.core.errors import ConfigError, ImageError
from pipeline.edges import images
from pipeline.edges.images import ImageLoader, ImagePayload
from pipeline.edges.preflight import prepare
from pipeline.edges.preflightjob import to_payload

HIGH = ImagesConfig(fit="openai-high")


def photo(size: tuple[int, int], orientation: int = 1, mode: str = "RGB") -> bytes:
    """A JPEG with detail (so resizing it is real work) and an EXIF orientation."""
    image = Image.radial_gradient("L").resize(size).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def inputs() -> dict[str, bytes]:
    png = io.BytesIO()
    Image.linear_gradient("L").resize((900, 700)).convert("RGBA").save(png, "PNG")
    return {
        "wide.jpg": photo((2400, 1800)),
        "upright.jpg": photo((2400, 1800), orientation=6),
        "cmyk.jpg": photo((1600, 1200), mode="CMYK"),
        "alpha.png": png.getvalue(),
        "small.jpg": photo((320, 240)),  # passes as it is, via the pool all the same (inline_bytes=0)
    }


def in_process(data: bytes, name: str, policy: ImagesConfig) -> ImagePayload:
    return to_payload(data, prepare(data, name, policy))


def pool_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.pid is not None}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_worker_processes_send_exactly_what_prepare_makes_here(tmp_path: Path) -> None:
    files = inputs()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    before = pool_pids()
    async with ImageLoader(HIGH, inline_bytes=0, workers=2) as loader:
        got = {name: await loader.load(name, tmp_path) for name in files}
        got["bytes.jpg"] = await loader.load("bytes.jpg", tmp_path, data=files["upright.jpg"])  # handed-in bytes
        workers = pool_pids() - before
    assert workers and os.getpid() not in workers  # the work really left this process
    for name, data in files.items():
        assert got[name] == in_process(data, name, HIGH), name
    assert got["bytes.jpg"] == in_process(files["upright.jpg"], "bytes.jpg", HIGH)
    assert got["upright.jpg"].report["sent_width"] == 768 and got["upright.jpg"].report["sent_height"] == 1024
    assert got["wide.jpg"].sha256 == hashlib.sha256(files["wide.jpg"]).hexdigest()


@pytest.mark.parametrize("pool", ["process", "thread"])
async def test_a_broken_image_in_the_pool_is_the_same_failed_row(tmp_path: Path, pool: Any) -> None:
    data = photo((2400, 1800))
    cut = data[: len(data) // 2]  # truncated mid-scan: only decoding finds out
    (tmp_path / "cut.jpg").write_bytes(cut)
    with pytest.raises(ImageError) as here:
        prepare(cut, "cut.jpg", HIGH)
    async with ImageLoader(HIGH, inline_bytes=0, pool=pool) as loader:
        with pytest.raises(ImageError) as there:
            await loader.load("cut.jpg", tmp_path)
        ok = await loader.load("ok.jpg", tmp_path, data=data)  # the pool still works after a failed row
    assert str(there.value) == str(here.value) and "cut.jpg" in str(there.value)
    assert there.value.error_type == here.value.error_type == "image_corrupt"
    assert there.value.row_specific
    assert ok.report["image_action"] == "re_encoded"


async def test_the_pool_is_shut_down_at_the_end(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo((2400, 1800)))
    before = pool_pids()
    async with ImageLoader(HIGH, workers=2) as loader:
        await loader.load("a.jpg", tmp_path)
        workers = pool_pids() - before
        assert workers
    assert all(gone(pid) for pid in workers)  # stopped and reaped, not left to the interpreter's exit


async def test_images_that_go_as_they_are_start_no_pool(tmp_path: Path) -> None:
    (tmp_path / "small.jpg").write_bytes(photo((320, 240)))
    before = pool_pids()
    async with ImageLoader(HIGH) as loader:
        payload = await loader.load("small.jpg", tmp_path)
        assert pool_pids() == before
    assert payload.report["image_action"] == "pass_through"


async def test_the_pool_starts_off_the_event_loop_with_all_its_workers(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting the fork server blocks until it has imported pre-flight: on the loop it would stall the
    streams in flight."""
    started_in: list[threading.Thread] = []
    real = images._new_pool

    def recording(kind: Any, workers: int) -> Any:
        started_in.append(threading.current_thread())
        return real(kind, workers)

    monkeypatch.setattr(images, "_new_pool", recording)
    (tmp_path / "a.jpg").write_bytes(photo((2400, 1800)))
    before = pool_pids()
    async with ImageLoader(HIGH, workers=2) as loader:
        await loader.load("a.jpg", tmp_path)
        workers = pool_pids() - before
    assert len(started_in) == 1 and started_in[0] is not threading.current_thread()
    assert len(workers) == 2  # one image, yet both workers: started together, off the loop


async def test_workers_never_import_pydantic_or_the_config(tmp_path: Path) -> None:
    """The fork server imports pre-flight alone and the policy reaches a worker as a plain ``PixelPolicy``:
    the config schema (pydantic) would cost the fork server 0.15 CPU-s before the first photo."""
    (tmp_path / "a.jpg").write_bytes(photo((2400, 1800)))
    before = pool_pids()
    async with ImageLoader(HIGH, workers=1) as loader:
        payload = await loader.load("a.jpg", tmp_path)  # the worker has unpickled the policy by now
        maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in pool_pids() - before}
    assert payload == in_process((tmp_path / "a.jpg").read_bytes(), "a.jpg", HIGH)
    assert maps and all("PIL/_imaging" in m for m in maps.values())  # the maps do list what a worker loaded
    assert not [pid for pid, m in maps.items() if "pydantic_core" in m]


def _mapped_while_holding(*_: Any) -> int:
    """In a worker: bytes glibc holds in mapped blocks while a 40 MB buffer (a 10 MP image's pixels) lives."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    buffer = bytearray(40 << 20)
    mapped = int(mallinfo2().hblkhd)
    del buffer
    return mapped


async def test_a_worker_keeps_a_photos_buffers_in_its_heap() -> None:
    """glibc would map a buffer this big afresh for every photo and unmap it when freed (page faults each
    time); a worker takes it from its heap and keeps it for the next photo."""
    async with ImageLoader(HIGH, workers=1) as loader:
        mapped = await loader._in_pool("probe", _mapped_while_holding)
    assert mapped < 40 << 20


def _die(*_: Any) -> None:
    os._exit(3)  # what a decoder crash or the OOM killer looks like from the pool


async def test_a_dead_worker_fails_its_row_and_a_fresh_pool_takes_the_next(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo((2400, 1800)))
    async with ImageLoader(HIGH, workers=1) as loader:
        with pytest.raises(ImageError) as info:
            await loader._in_pool("crash.jpg", _die)
        payload = await loader.load("a.jpg", tmp_path)
    assert info.value.error_type == "image_corrupt" and info.value.row_specific
    assert str(info.value).startswith("crash.jpg: the pre-flight worker process died twice")
    assert payload.report["sent_width"] == 1024


async def test_ctrl_c_does_not_kill_the_workers(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(photo((2400, 1800)))
    before = pool_pids()
    async with ImageLoader(HIGH, workers=1) as loader:
        await loader.load("a.jpg", tmp_path)
        workers = pool_pids() - before
        for pid in workers:
            os.kill(pid, signal.SIGINT)  # what the terminal sends the whole process group
        again = await loader.load("a.jpg", tmp_path, data=(tmp_path / "a.jpg").read_bytes())
        assert pool_pids() - before == workers  # the same workers: none died, no fresh pool was needed
    assert again.report["sent_width"] == 1024


def test_preflight_pool_config_key() -> None:
    base = {"endpoint": {"base_url": "http://127.0.0.1:9/v1"}, "request": {"model": "m", "prompt": "p"},
            "input": {"manifest": "m.csv"}, "output": {"path": "o.parquet"}}
    assert config_from_dict(base).run.preflight_pool == "process"
    assert config_from_dict({**base, "run": {"preflight_pool": "thread"}}).run.preflight_pool == "thread"
    with pytest.raises(ConfigError, match="preflight_pool"):
        config_from_dict({**base, "run": {"preflight_pool": "fork"}})


def test_every_setting_pre_flight_reads_is_in_the_workers_policy() -> None:
    """Workers get a ``PixelPolicy``, not the ``ImagesConfig``: a setting that ``preflight.py`` or
    ``preflightjob.py`` reads from ``policy`` but that the plain copy lacks would fail only in a worker."""
    import ast
    import dataclasses

    from pipeline.core.config import ImagesConfig
    from pipeline.edges import preflight, preflightjob
    from pipeline.edges.preflight import PixelPolicy

    read = set()
    for module in (preflight, preflightjob):
        tree = ast.parse(Path(module.__file__).read_text())
        read |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "policy"}
    fields = {field.name for field in dataclasses.fields(PixelPolicy)}
    assert read and read <= fields, f"read from policy but not in PixelPolicy: {sorted(read - fields)}"
    copy = PixelPolicy.of(ImagesConfig(fit="openai-high", quality=70, max_bytes=1_000_000))
    assert (copy.fit, copy.quality, copy.max_bytes) == ("openai-high", 70, 1_000_000)
