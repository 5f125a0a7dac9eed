"""Your persona: {{user}} and the description block, global and per persona; a change drops only the preambles using it."""

from __future__ import annotations

import pytest

from app.catalog import Catalog
from app.cli import main
from app.engine import commands as cmd
from app.errors import ParleyError
from app.personas import load_personas, parse_persona_toml, preamble_hash, preamble_messages, save_persona
from tests.engine_helpers import EngineRunner, write_persona


def persona_file(folder, pid: str, extra: str = "", prompt: str = "You are {{char}}. You talk to {{user}}.") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{pid}.toml").write_text(
        f'id = "{pid}"\nname = "{pid.title()}"\nsystem_prompt = "{prompt}"\ngreetings = ["Hi {{{{user}}}}."]\n'
        f'[sampling]\ntemperature = 0.0\nmax_tokens = 4\n{extra}')


def test_global_name_and_description_fill_the_preamble(tmp_path, capsys):
    persona_file(tmp_path, "ada")
    assert main(["user", "--name", "Robin", "--description", "A sailor from Vell."]) == 0
    assert "name: Robin" in capsys.readouterr().out
    persona = load_personas([tmp_path]).personas["ada"]
    system, greeting = preamble_messages(persona)
    assert "You talk to Robin." in system["content"]
    assert "About Robin, who you are talking to: A sailor from Vell." in system["content"]
    assert greeting["content"] == "Hi Robin."


def test_a_persona_may_override_the_global_profile_and_keeps_it_when_saved(tmp_path):
    main(["user", "--name", "Robin"])
    persona_file(tmp_path, "ada", extra='[user]\nname = "Captain"\n')
    persona = load_personas([tmp_path]).personas["ada"]
    assert "You talk to Captain." in preamble_messages(persona)[0]["content"]
    assert "About" not in preamble_messages(persona)[0]["content"]
    out = tmp_path / "saved"
    save_persona(persona, out)
    assert "[user]" in (out / "ada.toml").read_text() and "Robin" not in (out / "ada.toml").read_text()
    assert load_personas([out]).personas["ada"].user == persona.user


def test_default_is_user_and_bad_profile_is_named(tmp_path, parley_home):
    persona_file(tmp_path, "ada")
    assert "You talk to User." in preamble_messages(load_personas([tmp_path]).personas["ada"])[0]["content"]
    (parley_home / "user.toml").write_text("name = 3\n")
    result = load_personas([tmp_path])
    assert "ada" in result.personas and any("user.toml" in p and "user.name" in p for p in result.problems)
    with pytest.raises(ParleyError, match="user.name"):
        parse_persona_toml(b'id = "a"\nname = "A"\n[user]\nname = "two\\nlines"\n', "a.toml")


def test_changing_the_profile_changes_only_the_preambles_that_use_it(tmp_path):
    persona_file(tmp_path, "ada")
    persona_file(tmp_path, "bob", prompt="You are {{char}}.")
    (tmp_path / "bob.toml").write_text((tmp_path / "bob.toml").read_text().replace("Hi {{user}}.", "Hi."))
    before = {k: preamble_hash(p) for k, p in load_personas([tmp_path]).personas.items()}
    main(["user", "--name", "Robin"])
    after = {k: preamble_hash(p) for k, p in load_personas([tmp_path]).personas.items()}
    assert before["ada"] != after["ada"] and before["bob"] == after["bob"]


def test_engine_drops_only_the_caches_of_personas_using_the_profile(tiny_model_dir, tmp_path):
    folder = tmp_path / "personas"
    persona_file(folder, "ada")
    write_persona(folder, "bob")
    runner = EngineRunner(tiny_model_dir, folder)
    try:
        with Catalog() as catalog:
            a, b = catalog.create_conversation("ada"), catalog.create_conversation("bob")
        runner.run(cmd.Generate(a, "hello"))
        runner.run(cmd.Generate(b, "hello"))
        main(["user", "--name", "Robin"])
        again_a, _ = runner.run(cmd.Generate(a, "again"))
        again_b, _ = runner.run(cmd.Generate(b, "again"))
        assert again_a.stats.cache == "none" and again_a.stats.reused_tokens == 0
        assert again_b.stats.cache == "ram" and again_b.stats.reused_tokens > 0
    finally:
        runner.close()
