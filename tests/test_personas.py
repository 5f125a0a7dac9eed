"""Persona files: shipped set, loading rules, bad files, preamble and its hash, saving."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ParleyError
from app.personas import (
    Persona,
    dump_persona_toml,
    load_personas,
    new_persona_id,
    parse_persona_toml,
    post_history,
    preamble_hash,
    preamble_messages,
    save_persona,
    shipped_personas_dir,
    slugify,
    unique_id,
)
from app.personas.tomlfile import toml_string

GOOD = """
name = "Ada"
description = "A mathematician."
greetings = ["Hello, {{user}}. I am {{char}}."]
system_prompt = "You are Ada."
color = "#112233"
[sampling]
temperature = 0.4
max_tokens = 100
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# -- shipped personas -----------------------------------------------------------


def test_shipped_personas_load_cleanly():
    result = load_personas([shipped_personas_dir()])
    assert result.problems == []
    personas = result.personas
    assert len(personas) >= 8
    assert "assistant" in personas
    for wanted in ("captain", "detective", "maths-tutor", "chemistry-teacher", "language-partner", "history-guide"):
        assert wanted in personas
    assert len({p.color for p in personas.values()}) == len(personas), "accent colours must differ"
    for p in personas.values():
        assert p.greetings and p.system_prompt
        assert len(p.system_prompt) < 600, f"{p.id}: keep prompts short for a 135M model"
        assert p.source and p.source.parent == shipped_personas_dir()


def test_default_dirs_are_shipped_then_user(parley_home):
    write(parley_home / "personas", "assistant.toml", 'name = "My Assistant"\n')
    write(parley_home / "personas", "ada.toml", GOOD)
    result = load_personas()
    assert result.personas["assistant"].name == "My Assistant"  # user overrides shipped
    assert "captain" in result.personas and "ada" in result.personas
    assert result.problems == []


# -- loading rules ------------------------------------------------------------------


def test_fields_and_defaults(tmp_path):
    write(tmp_path, "ada.toml", GOOD)
    p = load_personas([tmp_path]).personas["ada"]
    assert (p.id, p.name, p.temperature, p.top_p, p.max_tokens) == ("ada", "Ada", 0.4, 0.95, 100)
    assert p.greetings == ("Hello, {{user}}. I am {{char}}.",)
    assert p.source == tmp_path / "ada.toml"


def test_broken_files_are_reported_and_others_load(tmp_path):
    write(tmp_path, "good.toml", GOOD)
    write(tmp_path, "badtoml.toml", 'name = "unterminated\n')
    write(tmp_path, "noname.toml", 'description = "who am I"\n')
    write(tmp_path, "wrongtype.toml", 'name = "X"\ngreetings = "hi"\ntemperature = 1\n[sampling]\nmax_tokens = "lots"\n')
    write(tmp_path, "huge.toml", 'name = "X"\nsystem_prompt = "' + "a" * (65 * 1024) + '"\n')
    write(tmp_path, "badcolor.toml", 'name = "X"\ncolor = "red"\n')
    write(tmp_path, "Bad Id.toml", 'name = "X"\n')
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00name")
    write(tmp_path, "warn.toml", 'name = "W"\ntemperature = 1\n')
    result = load_personas([tmp_path])
    assert list(result.personas) == ["good", "warn"]
    text = "\n".join(result.problems)
    for fragment in (
        "badtoml.toml: not valid TOML",
        "noname.toml: field 'name'",
        "wrongtype.toml: field 'max_tokens'",
        "huge.toml: field 'system_prompt' is 65 KB",
        "badcolor.toml: field 'color'",
        "Bad Id.toml: field 'id'",
        "binary.toml: the file is not UTF-8",
    ):
        assert fragment in text, fragment
    assert "warn.toml: unknown key 'temperature'" in text  # it belongs in [sampling]; the persona still loads


def test_hundred_megabyte_field_is_rejected_quickly(tmp_path):
    path = tmp_path / "big.toml"
    with path.open("w") as f:
        f.write('name = "Big"\ndescription = "x"\nscenario = "')
        chunk = "a" * (1024 * 1024)
        for _ in range(100):
            f.write(chunk)
        f.write('"\ncolor = "#000000"\n')
    result = load_personas([tmp_path])
    assert result.personas == {}
    assert "big.toml: field 'scenario'" in result.problems[0]


def test_duplicate_id_in_one_folder(tmp_path):
    write(tmp_path, "a.toml", 'id = "same"\nname = "A"\n')
    write(tmp_path, "b.toml", 'id = "same"\nname = "B"\n')
    result = load_personas([tmp_path])
    assert result.personas["same"].name == "A"
    assert any("b.toml: field 'id'" in p and "a.toml" in p for p in result.problems)


def test_missing_folders_are_fine(tmp_path):
    assert load_personas([tmp_path / "nope"]).personas == {}


# -- preamble -------------------------------------------------------------------


def persona(**kw) -> Persona:
    base = dict(id="ada", name="Ada", system_prompt="You are {{char}}.", greetings=("Hi {{user}}!", "Hello again"))
    base.update(kw)
    return Persona(**base)


def test_preamble_messages():
    p = persona(
        description="A mathematician.",
        personality="precise",
        scenario="A salon in London.",
        examples="<START>\n{{user}}: hi\n{{char}}: hello",
        creator_notes="SECRET NOTES",
        post_history_instructions="Stay as {{char}}.",
    )
    messages = preamble_messages(p)
    assert [m["role"] for m in messages] == ["system", "assistant"]
    system = messages[0]["content"]
    assert system.startswith("You are Ada.")
    for part in ("A mathematician.", "Ada's personality: precise", "Scenario: A salon in London.", "User: hi\nAda: hello"):
        assert part in system
    assert "<START>" not in system and "SECRET" not in system and "Stay as" not in system
    assert messages[1]["content"] == "Hi User!"
    assert post_history(p) == "Stay as Ada."
    assert p.preamble_messages() == messages and p.preamble_hash() == preamble_hash(p)


def test_default_system_prompt_and_no_greeting():
    messages = preamble_messages(persona(system_prompt="", greetings=()))
    assert messages == [{"role": "system", "content": "You are Ada. Stay in character and keep replies short."}]


def test_hash_changes_only_with_the_preamble():
    p = persona()
    h = preamble_hash(p)
    assert len(h) == 64
    for same in (
        dict(color="#000000"),
        dict(temperature=1.5, top_p=0.5, max_tokens=7),
        dict(greetings=("Hi {{user}}!", "a different second greeting")),
        dict(creator_notes="notes"),
        dict(post_history_instructions="later"),
        dict(tags=("x",)),
    ):
        assert preamble_hash(dataclasses.replace(p, **same)) == h, same
    for different in (
        dict(system_prompt="You are {{char}}!"),
        dict(greetings=("Hey",)),
        dict(name="Ada L."),
        dict(scenario="Paris"),
        dict(examples="x"),
        dict(description="d"),
    ):
        assert preamble_hash(dataclasses.replace(p, **different)) != h, different


# -- saving and ids -----------------------------------------------------------------


def test_save_and_reload_round_trip(parley_home):
    p = persona(
        description='Quotes " and \\ backslashes\nand lines',
        examples="a\tb\r\nc",
        extensions={"depth_prompt": {"depth": 4, "prompt": None}, "list": [1, "two", None]},
        card={"creator": "me", "character_book": {"entries": []}},
        tags=("a", "b"),
        color="#abcdef",
    )
    path = save_persona(p)
    assert path == parley_home / "personas" / "ada.toml"
    loaded = load_personas().personas["ada"]
    assert loaded == p
    assert loaded.source == path


def test_new_ids_do_not_clash(parley_home):
    assert slugify("Captain Mara Vell!") == "captain-mara-vell"
    assert slugify("Lucía") == "lucia"
    assert slugify("★★★") == "persona"
    assert unique_id("Ada", {"ada", "ada-2"}) == "ada-3"
    assert new_persona_id("Assistant") == "assistant-2"  # shipped id is taken
    write(parley_home / "personas", "bob.toml", "not toml at all [")
    assert new_persona_id("Bob") == "bob-2"  # a broken file still owns its name


# -- property-based: the parser only ever raises ParleyError --------------------------

text = st.text(max_size=200)
toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["name", "x", "temperature"]), children, max_size=4),
    max_leaves=10,
)


@given(st.binary(max_size=2000))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_bytes_never_crash(data):
    try:
        parse_persona_toml(data, "fuzz.toml", default_id="fuzz")
    except ParleyError as exc:
        assert "fuzz.toml" in str(exc)


@given(st.dictionaries(st.sampled_from(sorted(
    ["id", "name", "description", "color", "tags", "greetings", "system_prompt", "examples", "sampling", "card",
     "personality", "scenario", "creator_notes", "post_history_instructions", "other"])), toml_values, max_size=8))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_well_formed_toml_with_wrong_types_never_crashes(doc):
    lines = []
    for key, value in doc.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml_inline(value)}")
    data = "\n".join(lines).encode()
    try:
        tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError:
        return
    try:
        p, _ = parse_persona_toml(data, "fuzz.toml", default_id="fuzz")
    except ParleyError as exc:
        assert "fuzz.toml" in str(exc)
    else:
        assert p.name.strip()


def _toml_inline(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_inline(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_inline(v) for v in value if v is not None) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return toml_string(value)


printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@given(
    name=printable.filter(lambda s: s.strip() and "\n" not in s and len(s) <= 200),
    system_prompt=printable,
    greetings=st.lists(printable, max_size=3),
    examples=printable,
    temperature=st.floats(0, 5),
    max_tokens=st.integers(1, 65536),
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_dump_then_parse_is_exact(name, system_prompt, greetings, examples, temperature, max_tokens):
    p = Persona(
        id="p", name=name.strip(), system_prompt=system_prompt, greetings=tuple(greetings), examples=examples,
        temperature=temperature, max_tokens=max_tokens,
    )
    again, warnings = parse_persona_toml(dump_persona_toml(p).encode(), "p.toml")
    assert again == p and warnings == []


@given(printable)
def test_toml_string_round_trips(value):
    assert tomllib.loads(f"v = {toml_string(value)}")["v"] == value
