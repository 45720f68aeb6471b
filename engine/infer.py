"""What t2f-infer does besides generating: face images read in, a run's files made, the interactive loop.

Library calls with no command-line handling: the CLI (engine/cli.py) maps its options onto
them, turns `ImageInputError` into a usage error and writes the files they return.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings

import numpy as np

from t2f.errors import T2FError

MAX_IMAGE_PIXELS = 40_000_000   # A conditioning image (CLIP sees 224x224): a 13000x13000 PNG is refused before decoding.

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}   # file extension -> what is written


class ImageInputError(T2FError, ValueError):
    """A conditioning image that cannot be read or is too large; one line naming the file."""


# ----------------------------------------------------------------------------
# Images in.


def load_face_images(paths: list[str]):
    """Face images -> [count, 3, 256, 256] float in [-1, 1] (center-cropped squares); ImageInputError for the first bad one."""
    import PIL.Image
    import torch

    from t2f.files import InputPathError, open_regular_file

    from .pipeline import face_tensor

    out = []
    for path in paths:
        try:
            with open_regular_file(path) as f:                  # a FIFO is refused, not waited on
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)     # our own limit is lower
                    im = PIL.Image.open(f)
                with im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise ImageInputError(f"{path} is {im.width}x{im.height} ({im.width * im.height / 1e6:.0f} "
                                              f"Mpixels); conditioning images may have at most "
                                              f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpixels (CLIP sees 224x224): downscale it first")
                    out.append(face_tensor(im))
        except ImageInputError:
            raise
        except InputPathError as e:
            raise ImageInputError(str(e)) from None
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise ImageInputError(f"cannot read image {path}: {e}") from None
    return torch.stack(out)


# ----------------------------------------------------------------------------
# Files out.


def image_bytes(array: np.ndarray, info: dict, path: str = "image.png") -> bytes:
    """[H, W, C] uint8 -> PNG (with the run's options as a `t2f` text chunk) or JPEG (quality 95), by `path`'s extension."""
    import PIL.Image
    import PIL.PngImagePlugin

    image_format = IMAGE_FORMATS[os.path.splitext(path)[1].lower()]
    mode = "L" if array.shape[-1] == 1 else "RGB"
    image = PIL.Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode)
    buf = io.BytesIO()
    if image_format == "PNG":
        meta = PIL.PngImagePlugin.PngInfo()
        meta.add_text("t2f", json.dumps(info, sort_keys=True))
        image.save(buf, format="PNG", pnginfo=meta)
    else:
        image.save(buf, format="JPEG", quality=95, comment=json.dumps(info, sort_keys=True).encode())
    return buf.getvalue()


def grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows * cols, H, W, C] -> [rows * H, cols * W, C]."""
    _, h, w, c = images.shape
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def run_files(faces, labels: list[str], n: int, info: dict, out: str, save_images: str | None, save_ws: str | None) -> dict[str, bytes]:
    """A run's files by path: the grid in `out`'s format (a row per label), with save_images one PNG per image, with save_ws the ws."""
    images = faces.images.numpy()
    files = {out: image_bytes(grid(images, len(labels), n), info, out)}
    if save_images is not None:
        for i, img in enumerate(images):
            r, s = divmod(i, n)
            files[os.path.join(save_images, f"p{r:03d}_s{s:03d}.png")] = image_bytes(img, dict(info, label=labels[r], sample=s))
    if save_ws is not None:
        buf = io.BytesIO()
        np.save(buf, faces.ws.numpy())
        files[save_ws] = buf.getvalue()
    return files


# ----------------------------------------------------------------------------
# The interactive loop.


def _echo(message: str, err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def run_interactive(pipe, lines, *,
    out: str,                  # Grids are written as OUT-NNNN.EXT, one per prompt.
    write,                     # write(files: dict[path, bytes]): how the files reach the disk.
    mode: str, n: int, seed: int, truncation: float, noise_mode: str, knn: dict,
    echo=_echo,                # echo(message, err=False): a line of progress (err=True: to standard error).
) -> int:
    """Prompts, one per line of `lines` -> one grid file per prompt, with each prompt's latency; the number of prompts."""
    from .prompts import is_blank

    def generate(prompt: str):
        return pipe([prompt], n=n, seed=seed, truncation_psi=truncation, noise_mode=noise_mode, mode=mode, knn=knn)

    generate("a warm-up prompt")                                   # kernels, allocations, graph capture
    stem, ext = os.path.splitext(out)
    echo(f"ready ({pipe.summary}); one prompt per line, end with Ctrl-D", err=True)
    count = 0
    for line in lines:
        prompt = line.strip()
        if is_blank(prompt):
            continue
        start = time.perf_counter()
        faces = generate(prompt)
        elapsed = (time.perf_counter() - start) * 1000
        count += 1
        path = f"{stem}-{count:04d}{ext}"
        info = dict(mode=mode, labels=[prompt], n=n, seed=seed, truncation=truncation, backend=pipe.backend.name)
        write({path: image_bytes(grid(faces.images.numpy(), 1, n), info, path)})
        echo(f"{elapsed:8.1f} ms  {path}  {prompt}")
    echo(f"{count} prompt(s)", err=True)
    return count
