"""README.md's code blocks, as written: every `diet` command line is parsed, read (--config files), and
validated as the command validates it, up to the point where it would load the model; the Python example
runs; the YAML example is a config `diet prune` takes.

Substituted, because the real thing takes minutes or the network: the model a command would load is
this suite's tiny Gemma-3 (its config is what each prune is planned against; loading it, the step after
validation, is where a command stops); `scores.safetensors` is a score file of the tiny model; the shell
block's here-document is run by bash to write tickets.jsonl. Commands that read their task data from the
hub (`--data-source hub`, the paper's config) are parsed and their options and config read, not
validated further. Commands of other tools (make, python llama.cpp/..., llama.cpp/build/bin/...,
vllm) are not run; `torchrun ... -m dietprune.cli ARGS` is `diet ARGS` in one process.
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dietprune.cli import _settings, build_parser, main
from dietprune.models.load import ModelSource
from dietprune.settings import CalibrationSettings

README = Path(__file__).parents[1] / "README.md"
# the README's commands of other tools, not run: make (CI runs it), llama.cpp's converter and binaries, vLLM
OTHER_TOOLS = ("make", "python", "vllm", "llama.cpp/build/bin/llama-quantize",
               "llama.cpp/build/bin/llama-cli")


class Reached(Exception):
    """A command got to loading its model: everything before it, validation included, passed."""


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


HEREDOC = re.compile(r"^([^\n]*<<'(\w+)'\n.*?\n\2)$", flags=re.S | re.M)  # cat > f <<'END' ... END


def shell_commands() -> list[list[str]]:
    """The command lines of the bash blocks (continued lines joined, comments dropped), each here-document
    as one ["bash", "-c", text] command."""
    commands = []
    for block in blocks("bash"):
        for part in HEREDOC.split(block.replace("\\\n", " ")):
            if "<<'" in part:
                commands.append(["bash", "-c", part])
            elif not re.fullmatch(r"\w+", part):  # a here-document's delimiter, captured by the split
                lines = [shlex.split(line, comments=True) for line in part.splitlines()]
                commands += [words for words in lines if words]
    return commands


def diet_words(command: list[str]) -> list[str] | None:
    """The arguments of `diet` a command line runs (under torchrun too), or None for another tool."""
    if command[0] == "diet":
        return command[1:]
    if command[0] == "torchrun":
        return command[command.index("dietprune.cli") + 1:]
    assert command[0] in OTHER_TOOLS + ("bash",), command
    return None


COMMANDS = [words for command in shell_commands() if (words := diet_words(command)) is not None]


def test_the_readme_has_the_commands_this_file_expects():
    assert len(COMMANDS) >= 20 and ["prune"] in COMMANDS
    assert any(words[0] == "run" and "--calibration" in words for words in COMMANDS)
    assert [c[0] for c in shell_commands() if c[0] == "bash"] == ["bash"]  # the tickets here-document


@pytest.fixture
def readme_dir(tmp_path, tiny_dir, monkeypatch, isolated_cache):
    """A working directory holding what the README's commands name: its YAML example as prune.yaml,
    configs/, tickets.jsonl from the here-document; every model resolved to the tiny one, and loading it
    the point where a command stops."""
    from dietprune import api, validate
    from dietprune.models import load

    monkeypatch.chdir(tmp_path)
    [yaml] = blocks("yaml")
    (tmp_path / "prune.yaml").write_text(yaml)
    shutil.copytree(README.parent / "configs", tmp_path / "configs")
    for command in shell_commands():
        if command[0] == "bash":
            subprocess.run(command, check=True, cwd=tmp_path)

    def tiny(spec=None):
        return ModelSource(spec or "gemma-3-270m", str(tiny_dir))

    def reached(*args, **kwargs):
        raise Reached

    for module in (validate, api, load):
        monkeypatch.setattr(module, "resolve", tiny)
    monkeypatch.setattr(api, "load_model", reached)
    monkeypatch.setattr("dietprune.bench.bench", reached)
    return tmp_path


def write_scores(path: Path) -> None:
    """A score file of the tiny model, as `diet profile` writes one (random statistics)."""
    from dietprune.profile import ActivationStats
    from dietprune.scores import save_scores

    tasks = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    meta = {"hidden_size": 48, "settings": {"site": "block_output"}, "tasks": {t: {"ids": []} for t in tasks}}
    save_scores(path, {t: ActivationStats(torch.rand(48, dtype=torch.float64),
                                          torch.rand(48, dtype=torch.float64), 10) for t in tasks}, meta)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w) for w in COMMANDS])
def test_every_diet_command_parses_and_validates(words, readme_dir):
    args = build_parser().parse_args(words)
    if args.command == "inspect" or getattr(args, "scores", None):  # reads what `diet profile` wrote
        write_scores(Path("scores.safetensors"))
    settings = _settings(args.command_spec, args)  # options, config files, registry names
    calibration = settings.get(CalibrationSettings)
    if calibration is not None and calibration.data_source == "hub":
        return  # its task data comes from the network
    if args.command == "inspect":
        assert main(words) == 0
        return
    with pytest.raises(Reached):  # every check passed; the next step loads the model
        main(words)


def test_the_yaml_example_is_the_config_it_says(readme_dir):
    [yaml] = blocks("yaml")
    words = shlex.split(yaml.splitlines()[0].split(":", 1)[1])  # "# prune.yaml: diet prune --config ..."
    assert words == ["diet", "prune", "--config", "prune.yaml"]
    args = build_parser().parse_args(words[1:])
    settings = _settings(args.command_spec, args)
    assert {name: getattr(group, name) for group in settings.values() for name in ("sparsity", "tasks")
            if hasattr(group, name)} == {"sparsity": 0.3, "tasks": ("boolq", "arc_easy", "arc_challenge")}


@pytest.mark.slow
def test_the_python_example_runs(tiny_dir, tmp_path, monkeypatch, isolated_cache, capsys):
    """The README's Python block, with the tiny model's directory in place of "gemma-3-270m" (the only
    change), run in a fresh folder: it prunes (7 tasks x 100 samples, full recovery), saves, and prints
    the evaluation's average (8 tasks x 100 examples, perplexity): about 30 s even on the tiny model.
    The quick test below calls the same API names."""
    [code] = blocks("python")
    assert code.count('"gemma-3-270m"') == 1
    monkeypatch.chdir(tmp_path)
    exec(code.replace('"gemma-3-270m"', repr(str(tiny_dir))), {})
    average = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(average) == {"acc", "score"} and all(0 <= value <= 1 for value in average.values())
    assert (tmp_path / "out" / "p30" / "dietprune.json").is_file()


def test_the_api_names_stay_functions_after_their_submodules_are_imported(tiny_dir, isolated_cache):
    """`dietprune.evaluate` and `dietprune.profile` are also the names of submodules, which the API
    imports: the package's attributes stay the API functions."""
    import dietprune.api
    import dietprune.evaluate  # noqa: F401 (the submodule, imported by name)
    import dietprune.profile  # noqa: F401

    assert dietprune.evaluate is dietprune.api.evaluate and dietprune.profile is dietprune.api.profile
    from dietprune.evaluate import select_examples  # the submodules are still there

    assert select_examples("rte", 2)[0].task == "rte"
    results = dietprune.evaluate(str(tiny_dir), tasks=("rte",), heldout=(), limit=2, perplexity=False)
    assert results["tasks"]["rte"]["n"] == 2
