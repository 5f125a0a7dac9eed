"""Character cards: V2/V3 from JSON, PNG and CHARX; export; bad input; the CLI commands."""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli import main
from app.errors import ParleyError
from app.personas import load_personas, preamble_messages
from app.personas import charx as charx_module
from app.personas import png as png_module
from app.personas.cards import card_png, export_card, import_card, persona_to_card, read_card
from app.personas.png import SIGNATURE, iter_chunks, solid_png, text_chunks

EXTENSIONS = {"depth_prompt": {"depth": 4, "prompt": "x", "role": None}, "talkativeness": "0.5", "fav": False}


def v2(name="Seraphina", **data) -> dict:
    base = {
        "name": name,
        "description": "{{char}} is a guardian of the forest.",
        "personality": "kind, protective",
        "scenario": "{{user}} wakes in a glade.",
        "first_mes": "*{{char}} smiles.* You're awake, {{user}}.",
        "alternate_greetings": ["Hello, traveller.", ""],
        "mes_example": "<START>\n{{user}}: Who are you?\n{{char}}: A friend.",
        "creator_notes": "PRIVATE: tested on big models",
        "system_prompt": "",
        "post_history_instructions": "Write one paragraph.",
        "tags": ["fantasy"],
        "creator": "someone",
        "character_version": "1.2",
        "character_book": {"entries": [{"keys": ["glade"], "content": "A quiet place."}]},
        "extensions": EXTENSIONS,
    }
    base.update(data)
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": base}


def v3(name="Nova", **data) -> dict:
    card = v2(name, **data)
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    card["data"].update({"nickname": "No", "group_only_greetings": [], "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}]})
    return card


def as_bytes(card) -> bytes:
    return json.dumps(card).encode()


def png_with(chunks: list[tuple[bytes, bytes]]) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return SIGNATURE + chunk(b"IHDR", ihdr) + b"".join(chunk(k, b) for k, b in chunks) + chunk(
        b"IDAT", zlib.compress(b"\x00\x00\x00\x00")
    ) + chunk(b"IEND", b"")


def b64(card) -> bytes:
    return base64.b64encode(as_bytes(card))


def charx(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# -- mapping ------------------------------------------------------------------------


def test_v2_json_mapping():
    p = read_card(as_bytes(v2()), "card.json")
    assert p.id == "seraphina" and p.name == "Seraphina"
    assert p.greetings == ("*{{char}} smiles.* You're awake, {{user}}.", "Hello, traveller.")
    assert p.examples.startswith("<START>") and p.post_history_instructions == "Write one paragraph."
    assert p.extensions == EXTENSIONS
    assert p.card["character_book"]["entries"][0]["keys"] == ["glade"]
    system = preamble_messages(p)[0]["content"]
    assert system.startswith("You are Seraphina.")  # default system prompt: the card's is empty
    assert "Seraphina is a guardian of the forest." in system and "User wakes in a glade." in system
    assert "PRIVATE" not in json.dumps(preamble_messages(p))
    assert preamble_messages(p)[1]["content"] == "*Seraphina smiles.* You're awake, User."


def test_card_system_prompt_replaces_the_default():
    p = read_card(as_bytes(v2(system_prompt="Narrate as {{char}}. {{original}}")), "c.json")
    assert preamble_messages(p)[0]["content"].startswith("Narrate as Seraphina. You are Seraphina.")


def test_v3_and_v1_json():
    p = read_card(as_bytes(v3()), "v3.json")
    assert p.name == "Nova" and p.card["nickname"] == "No" and p.extensions == EXTENSIONS
    v1 = {"name": "Old", "description": "d", "first_mes": "hi", "personality": "", "scenario": "", "mes_example": ""}
    assert read_card(as_bytes(v1), "v1.json").greetings == ("hi",)


# -- PNG ------------------------------------------------------------------------------


def test_png_chara_and_ccv3_preference():
    only_v2 = png_with([(b"tEXt", b"chara\x00" + b64(v2("Old Name")))])
    assert read_card(only_v2, "a.png").name == "Old Name"
    both = png_with([(b"tEXt", b"chara\x00" + b64(v2("Old Name"))), (b"tEXt", b"ccv3\x00" + b64(v3("New Name")))])
    assert read_card(both, "b.png").name == "New Name"


def test_png_ztxt_and_itxt():
    z = png_with([(b"zTXt", b"chara\x00\x00" + zlib.compress(b64(v2("Zed"))))])
    assert read_card(z, "z.png").name == "Zed"
    i = png_with([(b"iTXt", b"ccv3\x00\x01\x00en\x00\x00" + zlib.compress(b64(v3("Ida"))))])
    assert read_card(i, "i.png").name == "Ida"


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated"),
        (png_with([(b"tEXt", b"other\x00x")]), "no character card"),
        (png_with([(b"tEXt", b"chara\x00!!!not base64!!!")]), "not valid base64"),
        (png_with([(b"tEXt", b"chara\x00" + base64.b64encode(b"{nope"))]), "not valid JSON"),
    ],
)
def test_bad_png(data, fragment):
    with pytest.raises(ParleyError, match=fragment) as info:
        read_card(data, "bad.png")
    assert "bad.png" in str(info.value)


def test_png_text_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(png_module, "MAX_TEXT_BYTES", 1024 * 1024)
    bomb = png_with([(b"zTXt", b"chara\x00\x00" + zlib.compress(b"A" * (64 * 1024 * 1024), 1))])
    assert len(bomb) < 1024 * 1024
    with pytest.raises(ParleyError, match="bomb.png: PNG text chunk 'chara' expands past"):
        read_card(bomb, "bomb.png")


def test_png_crc_is_checked():
    data = bytearray(png_with([(b"tEXt", b"chara\x00" + b64(v2()))]))
    data[40] ^= 0xFF
    with pytest.raises(ParleyError, match="CRC|corrupt"):
        read_card(bytes(data), "crc.png")


def test_generated_png_is_a_valid_image():
    data = solid_png("#ff8000", size=8, texts={"chara": "abc"})
    chunks = list(iter_chunks(data, "x.png"))
    assert [k for k, _ in chunks] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, color_type) == (8, 8, 8, 2)
    pixels = zlib.decompress(chunks[2][1])
    assert pixels == (b"\x00" + b"\xff\x80\x00" * 8) * 8
    assert text_chunks(data, "x.png") == {"chara": "abc"}


# -- CHARX -------------------------------------------------------------------------------


def test_charx_import():
    data = charx({"card.json": as_bytes(v3("Zip")), "assets/icon/main.png": solid_png("#000000")})
    assert read_card(data, "c.charx").name == "Zip"


@pytest.mark.parametrize(
    "files, fragment",
    [
        ({"readme.txt": b"hi"}, "no card.json"),
        ({"card.json": b" " * (20 * 1024 * 1024)}, "zip bomb"),
        ({f"f{i}.txt": b"" for i in range(1001)}, "entries"),
        ({"card.json": b"[1, 2]"}, "must be a JSON object"),
    ],
)
def test_bad_charx(files, fragment):
    with pytest.raises(ParleyError, match=fragment):
        read_card(charx(files), "bad.charx")


def test_charx_total_size_cap(monkeypatch):
    monkeypatch.setattr(charx_module, "MAX_TOTAL_BYTES", 1000)
    data = charx({"card.json": as_bytes(v3()), "big.bin": b"x" * 2000}, zipfile.ZIP_STORED)
    with pytest.raises(ParleyError, match="expand"):
        read_card(data, "big.charx")


def test_charx_lying_header_is_capped(monkeypatch):
    """card.json is read through a capped stream, whatever its header claims."""
    monkeypatch.setattr(charx_module, "MAX_CARD_JSON_BYTES", 100)
    data = charx({"card.json": as_bytes(v3())}, zipfile.ZIP_STORED)
    with pytest.raises(ParleyError, match="over"):
        read_card(data, "lying.charx")


# -- bad cards name the field ----------------------------------------------------------


@pytest.mark.parametrize(
    "card, field",
    [
        (v2(name=""), "name"),
        (v2(name=7), "name"),
        (v2(first_mes=["a"]), "first_mes"),
        (v2(alternate_greetings=5), "alternate_greetings"),
        (v2(tags=[1]), "tags"),
        (v2(extensions=[]), "extensions"),
        (v2(mes_example="x" * (70 * 1024)), "mes_example"),
        ({"spec": "chara_card_v9", "data": {}}, "spec"),
        ({"spec": "chara_card_v2", "data": "nope"}, "data"),
    ],
)
def test_bad_card_fields(card, field):
    with pytest.raises(ParleyError, match=f"field '{field}'") as info:
        read_card(as_bytes(card), "bad.json")
    assert "bad.json" in str(info.value)


def test_hundred_megabyte_field_names_the_field():
    card = v2(description="x" * (100 * 1024 * 1024))
    with pytest.raises(ParleyError, match="big.json: field 'description'"):
        read_card(as_bytes(card), "big.json")


def test_not_json():
    with pytest.raises(ParleyError, match="not valid JSON"):
        read_card(b"hello", "x.json")
    with pytest.raises(ParleyError, match="not valid JSON"):
        read_card(b"[" * 100000, "deep.json")


# -- import and export -----------------------------------------------------------------


def test_import_saves_with_fresh_ids(parley_home, tmp_path):
    path = tmp_path / "card.json"
    path.write_bytes(as_bytes(v2()))
    first = import_card(path)
    second = import_card(path)
    assert (first.id, second.id) == ("seraphina", "seraphina-2")
    assert first.source == parley_home / "personas" / "seraphina.toml"
    loaded = load_personas().personas
    assert loaded["seraphina"].extensions == EXTENSIONS
    assert loaded["seraphina"].card["character_book"] == v2()["data"]["character_book"]
    clash = tmp_path / "assistant.json"
    clash.write_bytes(as_bytes(v2(name="Assistant")))
    assert import_card(clash).id == "assistant-2"  # never replaces the shipped one


@pytest.mark.parametrize("suffix", [".json", ".png"])
def test_export_then_import_round_trips(tmp_path, suffix):
    original = read_card(as_bytes(v2()), "c.json")
    out = export_card(original, tmp_path / f"out{suffix}")
    again = read_card(out.read_bytes(), str(out))
    assert again == original
    card = persona_to_card(original)
    assert card["spec"] == "chara_card_v2" and card["data"]["extensions"]["talkativeness"] == "0.5"
    assert card["data"]["extensions"]["parley"]["color"] == original.color


def test_shipped_persona_round_trips_with_sampling(tmp_path):
    captain = load_personas().personas["captain"]
    again = read_card(card_png(captain), "c.png")
    assert again.temperature == captain.temperature and again.color == captain.color
    assert again.preamble_hash() == captain.preamble_hash()


def test_export_needs_a_known_suffix(tmp_path):
    with pytest.raises(ParleyError, match="json or .png"):
        export_card(read_card(as_bytes(v2()), "c.json"), tmp_path / "card.txt")


# -- command line ---------------------------------------------------------------------


def test_cli_personas_json(capsys):
    assert main(["personas", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    ids = [r["id"] for r in rows]
    assert "assistant" in ids and len(ids) >= 8
    assert all(r["cache"] in ("ram", "disk", "none") and r["name"] for r in rows)


def test_cli_personas_table_and_warnings(capsys, parley_home):
    (parley_home / "personas").mkdir(parents=True)
    (parley_home / "personas" / "broken.toml").write_text("name = ")
    assert main(["personas"]) == 0
    captured = capsys.readouterr()
    assert "captain" in captured.out and "CACHE" in captured.out
    assert "broken.toml" in captured.err


def test_cli_import_and_export(capsys, tmp_path, parley_home):
    card = tmp_path / "card.png"
    card.write_bytes(png_with([(b"tEXt", b"chara\x00" + b64(v2("Rin")))]))
    assert main(["import", str(card)]) == 0
    new_id = capsys.readouterr().out.strip()
    assert new_id == "rin"
    assert main(["export", new_id, str(tmp_path / "rin.json")]) == 0
    exported = json.loads((tmp_path / "rin.json").read_text())
    assert exported["data"]["name"] == "Rin"
    assert main(["export", "nobody", str(tmp_path / "x.json")]) == 1
    assert "nobody" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err


# -- property-based: only ParleyError ever comes out --------------------------------------


def _only_parley_error(data: bytes, origin: str) -> None:
    try:
        read_card(data, origin)
    except ParleyError as exc:
        assert origin in str(exc)


@given(st.binary(max_size=3000))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes(data):
    _only_parley_error(data, "fuzz.bin")


@given(st.binary(max_size=500))
@settings(max_examples=200)
def test_random_bytes_with_png_signature(data):
    _only_parley_error(SIGNATURE + data, "fuzz.png")


chunk_kinds = st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IDAT", b"IEND", b"abcd"])
chunk_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda k, v: k + b"\x00" + v, st.sampled_from([b"chara", b"ccv3"]), st.binary(max_size=200)),
    st.builds(lambda k, v: k + b"\x00" + base64.b64encode(v), st.sampled_from([b"chara", b"ccv3"]), st.binary(max_size=200)),
    st.builds(lambda k, v: k + b"\x00\x00" + zlib.compress(v), st.sampled_from([b"chara", b"ccv3"]), st.binary(max_size=200)),
)


@given(st.lists(st.tuples(chunk_kinds, chunk_bodies), max_size=6))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_well_formed_png_chunks_with_garbage(chunks):
    _only_parley_error(png_with(chunks), "fuzz.png")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
card_keys = st.sampled_from(
    ["name", "description", "personality", "scenario", "first_mes", "alternate_greetings", "mes_example", "tags",
     "extensions", "system_prompt", "creator_notes", "post_history_instructions", "character_book", "creator"]
)


@given(
    st.sampled_from(["chara_card_v2", "chara_card_v3", None, "x"]),
    st.dictionaries(card_keys, json_values, max_size=10),
    st.booleans(),
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_card_shaped_json_with_garbage(spec, data, wrap_png):
    card = {"spec": spec, "data": data} if spec else data
    blob = json.dumps(card).encode()
    if wrap_png:
        blob = png_with([(b"tEXt", b"chara\x00" + base64.b64encode(blob))])
    try:
        persona = read_card(blob, "fuzz.card")
    except ParleyError as exc:
        assert "fuzz.card" in str(exc)
    else:
        assert persona.name.strip()
        persona_to_card(persona)
        preamble_messages(persona)


@given(st.dictionaries(st.sampled_from(["card.json", "x/card.json", "a.png", "dir/"]), st.binary(max_size=300), max_size=4))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_charx_with_garbage(files):
    _only_parley_error(charx(files), "fuzz.charx")


@given(st.binary(min_size=1, max_size=400), st.integers(0, 400))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_charx(noise, at):
    data = bytearray(charx({"card.json": as_bytes(v3())}))
    at = at % len(data)
    data[at : at + len(noise)] = noise
    _only_parley_error(bytes(data), "fuzz.charx")
