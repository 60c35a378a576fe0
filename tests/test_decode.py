"""Decode stage without an engine: format sniffing, page planning, guards, colour handling."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from library.formats import DecodeLimits, ImageTooLarge, decode_image_frame, to_rgb
from library.shards import ShardSettings
from schemas.records import DecodeUnit, ErrorRecord, ImageItem, SourceFile, Stage
from transforms.decode import DecodeUnits, PlanUnits


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def pdf_bytes(pages: int) -> bytes:
    images = [Image.new("RGB", (200, 100), "white") for _ in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, "PDF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def run_file(path: str, limits: DecodeLimits = DecodeLimits(), shards: ShardSettings = ShardSettings()):
    """PlanUnits + DecodeUnits on one file: (items, errors)."""
    import os

    outputs = []
    for unit_or_error in PlanUnits(limits, shards).process(SourceFile(path, os.path.getsize(path))):
        if isinstance(unit_or_error, DecodeUnit):
            outputs.extend(DecodeUnits(limits, shards).process(unit_or_error))
        else:
            outputs.append(unit_or_error)
    items = [o for o in outputs if isinstance(o, ImageItem)]
    errors = [o.value for o in outputs if not isinstance(o, ImageItem)]
    assert all(isinstance(e, ErrorRecord) for e in errors)
    return items, errors


def test_pdf_is_recognised_by_content_not_extension(tmp_path):
    items, errors = run_file(write(tmp_path / "scan.png", pdf_bytes(2)))
    assert not errors
    assert [i.info.ref.page for i in items] == [0, 1]


def test_tar_whose_first_member_is_a_pdf_is_read_as_a_shard(tmp_path):
    from tests.shard_data import image_bytes, tar_bytes

    members = [("doc/0001.pdf", pdf_bytes(2)), ("img/0002.png", image_bytes((200, 30, 30)))]
    items, errors = run_file(write(tmp_path / "shard.tar", tar_bytes(members)))
    assert not errors
    assert sorted((i.info.ref.member, i.info.ref.page) for i in items) == [("doc/0001", 0), ("doc/0001", 1), ("img/0002", None)]


def link_tar(path, entries) -> str:
    """A tar of (name, TarInfo type, data or link target) entries."""
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload
                archive.addfile(info)
    return str(path)


def test_every_tar_member_that_is_not_a_file_gets_an_error_row(tmp_path):
    import tarfile

    from tests.shard_data import image_bytes

    path = link_tar(tmp_path / "shard.tar", [
        ("s", tarfile.DIRTYPE, ""),  # a folder: no input, no row
        ("s/0001.png", tarfile.REGTYPE, image_bytes((200, 30, 30))),
        ("s/0001.json", tarfile.SYMTYPE, "../../etc/passwd"),  # beside a real image: its sample still runs
        ("s/0002.png", tarfile.SYMTYPE, "0001.png"),
        ("s/0003.png", tarfile.LNKTYPE, "s/0001.png"),
        ("s/0004", tarfile.FIFOTYPE, ""),
    ])
    items, errors = run_file(path)
    assert [i.info.ref.member for i in items] == ["s/0001"]
    assert sorted((e.ref.member, e.error_type, e.stage) for e in errors) == [
        (name, "UnsupportedMember", Stage.PLAN) for name in ("s/0001.json", "s/0002.png", "s/0003.png", "s/0004")
    ]
    messages = {e.ref.member: e.message for e in errors}
    assert "symbolic link to ../../etc/passwd" in messages["s/0001.json"] and "not followed" in messages["s/0001.json"]
    assert "hard link to s/0001.png" in messages["s/0003.png"] and "FIFO" in messages["s/0004"]
    # The report re-reads the shard: a link's place shows why it has no image, the sample beside it its image.
    from reporting.images import load_images
    from schemas.records import ItemRef

    shown = load_images([ItemRef.make(path, member="s/0002.png"), ItemRef.make(path, member="s/0001")], DecodeLimits(),
                        ShardSettings())
    assert shown[f"{path}#member=s/0002.png"].reason.startswith("UnsupportedMember: tar member is a symbolic link to 0001.png")
    assert shown[f"{path}#member=s/0001"].image is not None
    # A shard of links only is those rows, not an "empty shard".
    _, [only] = run_file(link_tar(tmp_path / "links.tar", [("a.png", tarfile.SYMTYPE, "/tmp/a.png")]))
    assert (only.ref.member, only.error_type) == ("a.png", "UnsupportedMember")


def test_a_misspelt_passthrough_column_is_an_error_row_listing_the_shards_columns(tmp_path):
    from tests.shard_data import image_bytes, parquet_bytes

    path = write(tmp_path / "rows.parquet", parquet_bytes({"id": ["a"], "image": [image_bytes((1, 2, 3))], "question": ["Why?"]}))
    items, [error] = run_file(path, shards=ShardSettings(parquet_passthrough=("question", "qestion")))
    assert not items and (error.error_type, error.stage) == ("MissingColumn", Stage.PLAN)
    assert error.message == ("Parquet shard has no column 'qestion' (--parquet_passthrough_columns); "
                             "columns: ['id', 'image', 'question']")
    items, errors = run_file(path, shards=ShardSettings(parquet_passthrough=("question",)))
    assert not errors and [json.loads(i.info.metadata) for i in items] == [{"question": "Why?"}]


def test_long_pdf_is_cut_into_page_ranges(tmp_path):
    path = write(tmp_path / "long.pdf", pdf_bytes(5))
    units = list(PlanUnits(DecodeLimits(pages_per_unit=2), ShardSettings()).process(SourceFile(path, 1)))
    assert [(u.first_page, u.end_page) for u in units] == [(0, 2), (2, 4), (4, 5)]
    assert {u.page_count for u in units} == {5}


def test_page_limit_gives_a_clear_error(tmp_path):
    _, [error] = run_file(write(tmp_path / "long.pdf", pdf_bytes(4)), DecodeLimits(max_pages=3))
    assert error.stage is Stage.PLAN and "max_pages" in error.message


def test_pages_have_distinct_content_hashes(tmp_path):
    items, _ = run_file(write(tmp_path / "doc.pdf", pdf_bytes(2)))
    assert len({i.info.content_hash for i in items}) == 2


@pytest.mark.parametrize(
    "name, data, stage",
    [
        ("empty.png", b"", Stage.PLAN),
        ("not-a-pdf.pdf", b"%PDF-1.7\nthis is not really a pdf", Stage.PLAN),
        ("notes.txt", b"just some text, not an image", Stage.DECODE),
    ],
)
def test_bad_files_become_error_rows(tmp_path, name, data, stage):
    items, [error] = run_file(write(tmp_path / name, data))
    assert not items
    assert error.stage is stage and error.ref.source_uri.endswith(name) and error.message


def test_truncated_png_is_a_decode_error(tmp_path):
    data = png_bytes(Image.new("RGB", (64, 64), "red"))
    _, [error] = run_file(write(tmp_path / "cut.png", data[: len(data) // 2]))
    assert error.stage is Stage.DECODE


def test_decompression_bomb_is_refused_before_loading_pixels():
    data = png_bytes(Image.new("1", (5000, 5000)))
    with pytest.raises(ImageTooLarge, match="max_image_pixels"):
        decode_image_frame(data, 0, DecodeLimits(max_image_pixels=1_000_000))


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (300, 100), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    items, _ = run_file(write(tmp_path / "rot.jpg", png_bytes(image, "JPEG", exif=exif)))
    assert (items[0].info.width, items[0].info.height) == (100, 300)


def test_large_images_are_downscaled_but_report_source_size(tmp_path):
    items, _ = run_file(write(tmp_path / "big.png", png_bytes(Image.new("RGB", (2000, 1000)))), DecodeLimits(max_side=500))
    assert items[0].image.size == (500, 250)
    assert (items[0].info.width, items[0].info.height) == (2000, 1000)


def test_sixteen_bit_greyscale_keeps_contrast():
    array = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(array)))
    assert rgb.min() == 0 and rgb.max() == 255


def test_transparency_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    palette = transparent.convert("P")
    palette.info["transparency"] = 0
    assert to_rgb(palette).mode == "RGB"
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
