"""Help and README agree where a test can hold them to it (issue #22 items 20, 21): every flag has
help, every (sub)command a description, every `moe ...` command line in the README and in the
modules' usage docstrings parses with the real parser, the facts both state say the same, outputs of
the README's commands are git-ignored, and nothing cites a file that is not in the repository."""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_runtime.core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()



def _parsers(parser: argparse.ArgumentParser, name: str = "moe"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_command_has_a_description_and_every_flag_help():
    missing_help, missing_description = set(), []
    for name, p in _parsers(build_parser()):
        if name != "moe" and not p.description:
            missing_description.append(name)
        for a in p._actions:
            if a.dest != "help" and not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip():
                missing_help.add((name, (a.option_strings or [a.dest])[0]))
    assert not missing_description, f"subcommands without a description: {missing_description}"
    assert not missing_help, f"flags without help: {sorted(missing_help)}"


def test_help_shows_defaults():
    text = _help(["trace", "record"])
    assert "(default: 1)" in text and "(default: 'auto')" in text and "(default: 0)" in text


def _help(argv: list[str]) -> str:
    for name, p in _parsers(build_parser()):
        if name == " ".join(["moe", *argv]):
            return p.format_help()
    raise AssertionError(argv)


def _command_lines(text: str) -> list[str]:
    """`moe ...` / `.venv/bin/moe ...` / `python -m moe_runtime ...` commands of the bash blocks."""
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = re.sub(r"\s+#.*$", "", part.strip())
                if re.match(r"(\S*/)?moe\s|python -m moe_runtime\s", part):
                    found.append(part)
    return found


def _docstring_lines(text: str) -> list[str]:
    """The indented `moe ...` usage lines of a module docstring (the comment column cut off)."""
    return [re.split(r"\s{2,}", line.strip())[0] for line in text.splitlines() if line.startswith("    moe ")]


def _parse(command: str) -> argparse.Namespace:
    words = shlex.split(command)
    words = words[3:] if words[:3] == ["python", "-m", "moe_runtime"] else words[1:]
    return build_parser().parse_args(words)


def test_every_readme_command_line_parses_with_the_real_parser(capsys):
    lines = _command_lines(README)
    assert len(lines) >= 12, lines
    for line in lines:
        try:
            args = _parse(line)
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}\n{capsys.readouterr().err}")
        assert args.func is not None, line


@pytest.mark.parametrize("module", ["moe_runtime/core/cli.py", "moe_runtime/offload/generate_cli.py",
                                    "moe_runtime/offload/trace_cli.py"])
def test_every_usage_example_in_the_help_parses(module, capsys):
    import ast
    doc = ast.get_docstring(ast.parse((ROOT / module).read_text()), clean=False)
    lines = _docstring_lines(doc)
    assert lines, module
    for line in lines:
        try:
            _parse(line)
        except SystemExit:
            pytest.fail(f"{module} usage example does not parse: {line}\n{capsys.readouterr().err}")


def test_help_and_readme_state_the_same_facts():
    train = _help(["train"])
    # training time: the README's quick start and `moe train --help` (61 s measured on 2 cores)
    assert "about a minute on 2 cores" in " ".join(train.split())
    assert "about 1 min on 2 cores" in README and "two minutes" not in train
    # --batch-size: per micro-batch, over all workers, in both
    assert "batch_size / W" in " ".join(train.split()) and "batch_size / W" in README
    # --workers: which Ray it uses is what cluster/job.py's ensure_ray does
    workers = " ".join(train.split())
    assert "--ray-address, else of RAY_ADDRESS, else a new embedded local one" in workers
    from moe_runtime.cluster import job
    assert "RAY_ADDRESS" in job.ensure_ray.__doc__
    # the top-level help's cluster example fits a 2-core machine (4 workers need --cpus-per-worker 0.5)
    for line in _docstring_lines(build_parser().description):
        args = _parse(line)
        if getattr(args, "workers", 0):
            assert args.workers * args.cpus_per_worker <= 2, line


def test_every_simulator_policy_is_documented_in_help_and_readme():
    from moe_runtime.offload.simulate import SIM_POLICIES
    from moe_runtime.offload.trace_cli import POLICY_HELP
    assert set(POLICY_HELP) == set(SIM_POLICIES)
    text = _help(["trace", "simulate"])
    for policy in SIM_POLICIES:
        assert re.search(rf"^  {re.escape(policy)}\s+\S", text, re.M), policy
        assert f"`{policy}`" in README, policy


def test_readme_says_how_to_reach_an_s3_compatible_endpoint():
    assert "AWS_ENDPOINT_URL" in README and "endpoint_override" in README


def test_no_reference_to_a_file_outside_the_repository():
    files = [ROOT / "README.md", *ROOT.glob("moe_runtime/**/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("examples/**/*.py")]
    cited = [str(f.relative_to(ROOT)) for f in files if "PAPERS.md" in f.read_text()]
    assert not cited and not (ROOT / "PAPERS.md").exists(), f"cite PAPERS.md, which is not in the repo: {cited}"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_outputs_of_the_readme_commands_are_git_ignored():
    outputs = []
    for line in _command_lines(README):
        args = _parse(line)
        for dest in ("json", "trace_out"):
            if getattr(args, dest, None):
                outputs.append(getattr(args, dest))
        if getattr(args, "trace_command", None) == "record":
            outputs.append(args.out)
    assert {"runs/tiny/report.json", "runs/tiny/trace.msgpack"} <= set(outputs), outputs
    for path in [*outputs, "report.json", "trace.msgpack"]:  # also where older READMEs wrote them
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert r.returncode == 0, f"{path} (written by a README command) is not git-ignored"
