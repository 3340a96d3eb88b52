"""Job spec validation: every mistake is one line naming the field."""
from __future__ import annotations

import json

import pytest

from pipelines.spec import load_spec, parse_spec

BASE = {"name": "job-1", "model": "preset:tiny", "input": {"uri": "/data/in"},
        "output": {"uri": "/data/out"}}


def with_(path: str, value) -> dict:
    raw = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


def test_defaults_fill_in():
    spec = parse_spec(BASE)
    assert (spec.task.kind, spec.output.format, spec.resources.ep_size) == ("chat", "parquet", 1)
    assert spec.sampling.temperature == 0.0 and spec.input.format is None


@pytest.mark.parametrize("path, value, message", [
    ("input.bogus", 1, "job spec: input.bogus: unknown key"),
    ("colour", "red", "job spec: colour: unknown key"),
    ("sampling.temperature", -1, "job spec: sampling.temperature:"),
    ("sampling.top_p", 0, "job spec: sampling.top_p:"),
    ("sampling.max_tokens", 0, "job spec: sampling.max_tokens:"),
    ("input.format", "xml", "job spec: input.format:"),
    ("output.format", "csv", "job spec: output.format:"),
    ("task.kind", "translate", "job spec: task.kind:"),
    ("resources.replicas", 0, "job spec: resources.replicas:"),
    ("resources.ep_size", 0, "job spec: resources.ep_size:"),
    ("task.template", "Hi {text", "job spec: task.template: not a valid template"),
    ("task.template", "{text.__class__}", "job spec: task.template: template fields must be"),
    ("task.image_column", "img", "job spec: task.image_column: images need kind 'chat'"),
    ("name", "bad name/..", "job spec: name: must be letters"),
    ("input.limit", -3, "job spec: input.limit:"),
])
def test_bad_values_name_the_field(path, value, message):
    raw = with_(path, value)
    if path == "task.image_column":
        raw["task"]["kind"] = "score"
    with pytest.raises(ValueError) as err:
        parse_spec(raw)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_missing_required_field():
    raw = dict(BASE)
    del raw["output"]
    with pytest.raises(ValueError, match=r"^job spec: output: Field required$"):
        parse_spec(raw)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "a.yaml").write_text("name: j\nmodel: preset:tiny\ninput: {uri: s3://b/in/, "
                                     "format: jsonl}\noutput: {uri: s3://b/out/}\n")
    (tmp_path / "b.json").write_text(json.dumps(BASE))
    assert load_spec(tmp_path / "a.yaml").input.format == "jsonl"
    assert load_spec(tmp_path / "b.json").name == "job-1"
    (tmp_path / "c.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_spec(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError):
        load_spec(tmp_path / "missing.yaml")


def test_cli_prints_one_line(tmp_path, capsys):
    from cluster.cli import main
    (tmp_path / "j.yaml").write_text(json.dumps(with_("resources.ep_size", 0)))
    assert main(["batch", "run", str(tmp_path / "j.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltaray: error: job spec: resources.ep_size:") and "\n" not in err


def test_replicas_must_leave_a_cpu_share_for_reading():
    from pipelines.job import check_cpus
    spec = parse_spec(with_("resources", {"replicas": 2, "cpus_per_replica": 1}))
    check_cpus(spec, 4)
    with pytest.raises(ValueError, match=r"^resources: 2 replicas x cpus_per_replica 1\.0 \+ 0\.25 "
                                         r"for reading needs 2\.25 CPUs; the Ray cluster has 2$"):
        check_cpus(spec, 2)
