"""Every image mode arrives as the right 8-bit RGB, upright, compared with references computed here."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.dataset import DatasetArgs, load_dataset_plan
from engine.errors import DatasetError
from engine.images import load_rgb8, to_rgb8

W, H = 16, 8
RNG = np.random.default_rng(7)


def loaded(tmp_path: Path, path: Path, shown: tuple[int, int] = (W, H)) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels the dataset hands to training (uint8-valued HWC) and the planned size, for an image
    shown ``shown`` (width, height) big: the resolution is that size, so nothing is resized."""
    toml = tmp_path / "ds.toml"
    toml.write_text(f"[[datasets]]\nresolution = [{shown[0]}, {shown[1]}]\n[[datasets.subsets]]\n"
                    f"image_dir = \"{path.parent.as_posix()}\"\nclass_tokens = \"x\"\n", encoding="utf-8")
    plan = load_dataset_plan(DatasetArgs(dataset_config=toml))
    pixels = ((plan.load_image(0).permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.int64)
    return pixels, plan.entries[0].image_size


def converted(path: Path) -> np.ndarray:
    """``to_rgb8`` on a file no dataset extension covers (TIFF, PGM), as the loader calls it."""
    with Image.open(path) as im:
        return np.asarray(to_rgb8(im)).astype(np.int64)


def opened(path: Path) -> Image.Image:
    """How Pillow opens ``path`` (mode, info), without keeping the file open."""
    with Image.open(path) as im:
        return im


def gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(g, dtype=np.int64)[:, :, None], 3, axis=2)


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and int(np.abs(got - np.asarray(want, dtype=np.int64)).max()) <= 1


def png16(path: Path, samples: np.ndarray, color_type: int) -> Path:
    """A 16-bit-per-sample PNG written byte by byte (Pillow cannot write 48/64-bit colour PNGs)."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def saved(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def u8(*shape) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def u16(*shape) -> np.ndarray:
    return RNG.integers(0, 65536, size=shape, dtype=np.uint32).astype(np.uint16)


def from16(v) -> np.ndarray:
    return np.rint(np.asarray(v, dtype=np.float64) / 257.0)


# ---------------------------------------------------------------- through the dataset loader (PNG/JPEG)

def test_one_bit_png_arrives_black_and_white(tmp_path):
    bits = RNG.integers(0, 2, size=(H, W)).astype(bool)
    path = saved(tmp_path / "i" / "a.png", Image.fromarray(bits))
    assert opened(path).mode == "1"
    assert close(loaded(tmp_path, path)[0], gray3(bits * 255))


def test_grayscale_and_gray_alpha_png_drop_only_the_alpha(tmp_path):
    g, a = u8(H, W), u8(H, W)
    path = saved(tmp_path / "l" / "a.png", Image.fromarray(g))
    assert close(loaded(tmp_path, path)[0], gray3(g))
    path = saved(tmp_path / "la" / "a.png", Image.fromarray(np.stack([g, a], axis=2), "LA"))
    assert opened(path).mode == "LA"
    assert close(loaded(tmp_path, path)[0], gray3(g))


def test_palette_png_with_and_without_transparency_arrives_as_its_palette_colours(tmp_path):
    palette = u8(256, 3)
    idx = u8(H, W)
    im = Image.fromarray(idx, "L").convert("P")
    im.putpalette(palette.flatten().tolist())
    im.putdata(idx.flatten().tolist())
    plain = saved(tmp_path / "p" / "a.png", im)
    clear = saved(tmp_path / "pt" / "a.png", im, transparency=int(idx[0, 0]))
    assert opened(clear).mode == "P" and "transparency" in opened(clear).info
    for path in (plain, clear):
        assert close(loaded(tmp_path, path)[0], palette[idx])


def test_rgba_png_keeps_the_stored_colour_under_transparency(tmp_path):
    rgba = u8(H, W, 4)
    rgba[0, :, 3] = 0                                   # fully transparent row: its colour still counts
    path = saved(tmp_path / "i" / "a.png", Image.fromarray(rgba, "RGBA"))
    assert close(loaded(tmp_path, path)[0], rgba[:, :, :3])


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    v = u16(H, W)
    v[0, 0], v[0, 1] = 0, 65535
    path = saved(tmp_path / "i" / "a.png", Image.fromarray(v))
    assert opened(path).mode in ("I;16", "I")
    got = loaded(tmp_path, path)[0]
    assert close(got, gray3(from16(v)))
    assert got.mean() < 200                             # random 16-bit values are not near-white


def test_big_endian_sixteen_bit_grayscale_saved_as_png(tmp_path):
    v = u16(H, W)
    im = Image.frombytes("I;16B", (W, H), v.astype(">u2").tobytes())
    path = saved(tmp_path / "i" / "a.png", im)
    assert close(loaded(tmp_path, path)[0], gray3(from16(v)))


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4), (4, 2)], ids=["rgb48", "rgba64", "gray-alpha32"])
def test_sixteen_bit_colour_pngs_arrive_as_8_bit(tmp_path, color_type, channels):
    v = u16(H, W, channels)
    path = png16(tmp_path / "i" / "a.png", v, color_type)
    want = from16(v[:, :, :3]) if channels >= 3 else gray3(from16(v[:, :, 0]))
    assert close(loaded(tmp_path, path)[0], want)


def test_cmyk_jpeg_arrives_as_rgb(tmp_path):
    c, m, y, k = 100, 50, 200, 60
    path = saved(tmp_path / "i" / "a.jpg", Image.new("CMYK", (W, H), (c, m, y, k)), quality=100)
    assert opened(path).mode == "CMYK"
    want = np.rint([(255 - v) * (255 - k) / 255 for v in (c, m, y)])
    assert close(loaded(tmp_path, path)[0], np.broadcast_to(want, (H, W, 3)))


# ---------------------------------------------------------------- modes only TIFF (or memory) holds

def test_cmyk_tiff_matches_the_naive_conversion(tmp_path):
    cmyk = u8(H, W, 4)
    path = saved(tmp_path / "a.tif", Image.fromarray(cmyk, "CMYK"))
    k = cmyk[:, :, 3:].astype(np.float64)
    assert close(converted(path), np.rint((255 - cmyk[:, :, :3]) * (255 - k) / 255))


def test_palette_alpha_drops_the_alpha(tmp_path):
    palette, idx, alpha = u8(256, 3), u8(H, W), u8(H, W)
    pa = Image.new("PA", (W, H))
    pa.putpalette(palette.flatten().tolist())
    pa.putdata(list(zip(idx.flatten().tolist(), alpha.flatten().tolist())))
    path = saved(tmp_path / "a.tif", pa)
    assert opened(path).mode == "PA"
    assert close(converted(path), palette[idx])


@pytest.mark.parametrize("mode,dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_sixteen_bit_modes_scale_by_257(tmp_path, mode, dtype):
    v = u16(H, W)
    im = Image.frombytes(mode, (W, H), v.astype(dtype).tobytes())
    assert im.mode == mode
    assert close(np.asarray(to_rgb8(im)).astype(np.int64), gray3(from16(v)))
    if mode == "I;16B":
        path = saved(tmp_path / "a.tif", im)
        assert opened(path).mode == "I;16B"
        assert close(converted(path), gray3(from16(v)))


def test_32_bit_integer_is_read_as_16_bit_and_beyond_it_is_refused(tmp_path):
    v = u16(H, W).astype(np.int32)
    path = saved(tmp_path / "a.tif", Image.fromarray(v))
    assert opened(path).mode == "I"
    assert close(converted(path), gray3(from16(v)))
    pgm = tmp_path / "a.pgm"                            # Pillow opens 16-bit PGM as I, scaled to 0..65535
    pgm.write_bytes(f"P5 {W} {H} 1023\n".encode() + (v >> 6).astype(">u2").tobytes())
    assert opened(pgm).mode == "I"
    assert close(converted(pgm), gray3(np.rint((v >> 6) * 255 / 1023)))
    v[0, 0] = 70000
    path = saved(tmp_path / "b.tif", Image.fromarray(v))
    with pytest.raises(ValueError, match="70000"):
        converted(path)


def test_float_images_in_0_to_1_or_0_to_255_and_others_refused(tmp_path):
    unit = RNG.random((H, W), dtype=np.float32)
    path = saved(tmp_path / "unit.tif", Image.fromarray(unit))
    assert opened(path).mode == "F"
    assert close(converted(path), gray3(np.rint(unit * 255)))
    wide = unit * 255
    path = saved(tmp_path / "wide.tif", Image.fromarray(wide))
    assert close(converted(path), gray3(np.rint(wide)))
    wide[0, 0] = 300.0
    with pytest.raises(ValueError, match="0..1 or 0..255"):
        converted(saved(tmp_path / "bad.tif", Image.fromarray(wide)))


def test_refused_samples_are_one_dataset_line_naming_the_file(tmp_path):
    v = u16(H, W).astype(np.int32)
    v[0, 0] = -5
    path = saved(tmp_path / "a.tif", Image.fromarray(v))
    with pytest.raises(DatasetError) as info:
        load_rgb8(path)
    assert str(info.value) == (f"image {path} holds 32-bit integer samples from -5 to {v.max()}; only 0..65535 "
                               f"(16-bit) can be read as brightness; save it as an 8- or 16-bit PNG")


# ---------------------------------------------------------------- EXIF orientation

UPRIGHT = {   # EXIF orientation → how the stored array looks when shown (the EXIF spec's meaning)
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied_and_bucketed_upright(tmp_path, orientation):
    rgb = u8(H, W, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(tmp_path / "i" / "a.png", Image.fromarray(rgb), exif=exif)
    want = UPRIGHT[orientation](rgb)
    pixels, size = loaded(tmp_path, path, shown=(want.shape[1], want.shape[0]))
    assert size == (want.shape[1], want.shape[0])
    assert close(pixels, want)


def test_jpeg_with_orientation_6_loads_rotated_as_shown(tmp_path):
    stored = np.zeros((H, W, 3), dtype=np.uint8)
    stored[:, W // 2:] = 255                            # stored: black left half, white right half
    exif = Image.Exif()
    exif[0x0112] = 6                                    # "rotate 90° clockwise to show"
    path = saved(tmp_path / "i" / "a.jpg", Image.fromarray(stored), exif=exif, quality=100)
    pixels, size = loaded(tmp_path, path, shown=(H, W))
    assert size == (H, W)                               # shown portrait: 8 wide, 16 tall
    assert pixels.shape == (W, H, 3)
    assert pixels[: W // 2 - 2].max() < 20 and pixels[W // 2 + 2:].min() > 235    # black on top, white below
