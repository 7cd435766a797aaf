"""Training telemetry: metrics.jsonl, tensorboard scalars, the tqdm bar, the loss-curve PNG.

``MetricsLogger`` appends one JSON object per step to ``<output_dir>/metrics.jsonl`` and, with
``tensorboard=True``, the same numeric scalars (tags ``train/<key>``) to an event file under
``<output_dir>/tensorboard/``, written by ``fastjax.tb_events`` (no tensorboardX or TensorFlow
needed). Both are flushed every step, so a killed run keeps what it logged. ``truncate_after(step)``
drops the jsonl lines a resumed run redoes and writes a TensorBoard ``SessionLog.START`` at
``step + 1``, so TensorBoard discards those steps' old points too.

``write_loss_curve`` draws the loss curve with matplotlib (extra ``fastjax[plot]``) or, when
matplotlib is missing, with a tiny pure-numpy rasteriser and PNG encoder (zlib + struct): axes, tick
marks, the curve.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fastjax._io import atomic_write_bytes
from fastjax.tb_events import EventFileWriter


def device_memory_gib() -> tuple[float, float] | None:
    """(bytes in use, peak bytes in use) of the first device in GiB, or None where not reported
    (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except (RuntimeError, AttributeError, NotImplementedError):  # backends without memory stats
        return None
    if not stats or "bytes_in_use" not in stats:
        return None
    peak = stats.get("peak_bytes_in_use", stats["bytes_in_use"])
    return stats["bytes_in_use"] / 2**30, peak / 2**30


class MetricsLogger:
    """metrics.jsonl + tensorboard event file. ``truncate_after(step)`` drops the records of steps a
    resumed run redoes."""

    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._file = None
        self._tb = EventFileWriter(self.dir / "tensorboard") if tensorboard else None

    def truncate_after(self, step: int) -> list[dict]:
        """Keep only records with ``step <= step`` (a resumed run redoes the rest); returns them."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        if self._tb is not None:  # tensorboard drops already-logged events with step >= step + 1
            self._tb.add_session_start(step + 1)
        return kept

    def log(self, record: Mapping[str, Any]) -> None:
        if self._file is None:
            # kept open across steps (closed in close()); one flushed line per step
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(dict(record)) + "\n")
        self._file.flush()
        if self._tb is not None:
            scalars = {
                f"train/{k}": float(v)
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float))
            }
            self._tb.add_scalars(scalars, int(record["step"]))  # one event per step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl (a torn last line from a killed process is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# --------------------------------------------------------------------------------------------------
# Loss curve
# --------------------------------------------------------------------------------------------------


def write_loss_curve(
    path: str | os.PathLike,
    steps: Sequence[float],
    losses: Sequence[float],
    *,
    title: str = "training loss",
    backend: str = "auto",
) -> Path:
    """Write a loss-curve PNG. ``backend``: ``"auto"`` (matplotlib if importable), ``"matplotlib"``,
    or ``"numpy"`` (the built-in rasteriser)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if backend in ("auto", "matplotlib"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if backend == "matplotlib":
                raise
        else:
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            ax.plot(list(steps), list(losses), lw=1.5)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return path
    atomic_write_bytes(path, encode_png(render_curve(steps, losses)))
    return path


def render_curve(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    width: int = 640,
    height: int = 400,
    margin: int = 40,
) -> np.ndarray:
    """A white RGB image ``[height, width, 3]`` uint8 with black axes, ticks and the curve in
    blue."""
    img = np.full((height, width, 3), 255, np.uint8)
    # plot box; image rows grow downwards
    x0, x1, y0, y1 = margin, width - margin // 2, height - margin, margin // 2
    black, grey, blue = (0, 0, 0), (220, 220, 220), (31, 119, 180)
    for i in range(1, 5):  # light grid + ticks
        gx = x0 + (x1 - x0) * i // 4
        gy = y0 - (y0 - y1) * i // 4
        img[y1:y0, gx] = grey
        img[gy, x0:x1] = grey
        img[y0 : y0 + 5, gx] = black
        img[gy, x0 - 5 : x0] = black
    img[y0, x0 : x1 + 1] = black
    img[y1 : y0 + 1, x0] = black
    xs = np.asarray(xs, np.float64)
    ys = np.asarray(ys, np.float64)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if len(xs) == 0:
        return img
    xlo, xhi = float(xs.min()), float(xs.max())
    ylo, yhi = float(ys.min()), float(ys.max())
    xhi = xhi if xhi > xlo else xlo + 1
    pad = 0.05 * (yhi - ylo) if yhi > ylo else 0.5
    ylo, yhi = ylo - pad, yhi + pad
    px = x0 + 1 + (xs - xlo) / (xhi - xlo) * (x1 - x0 - 2)
    py = y0 - 1 - (ys - ylo) / (yhi - ylo) * (y0 - y1 - 2)
    pts = np.stack([px, py], 1)
    if len(pts) == 1:
        pts = np.concatenate([pts, pts])
    for (ax_, ay), (bx, by) in itertools.pairwise(pts):
        n = int(max(abs(bx - ax_), abs(by - ay))) + 1
        t = np.linspace(0.0, 1.0, n + 1)
        cx = np.rint(ax_ + t * (bx - ax_)).astype(int)
        cy = np.rint(ay + t * (by - ay)).astype(int)
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2-px wide line
            img[np.clip(cy + dy, 0, height - 1), np.clip(cx + dx, 0, width - 1)] = blue
    return img


def encode_png(img: np.ndarray) -> bytes:
    """8-bit RGB ``[H, W, 3]`` -> PNG bytes (filter 0 on every scanline, zlib level 9)."""
    img = np.ascontiguousarray(img, np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"encode_png expects [H, W, 3] uint8, got {img.shape=}")
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
