"""The alert rules: valid for Prometheus, each tested on the series it is about
(`promtool test rules`), and querying only what the processes export."""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml

from tests.unit.test_deploy import DEPLOY, exported_series, promql_metric_names

RULES = DEPLOY / "prometheus" / "alerts.yml"


def _promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    assert found, ("promtool not found: install Debian's `prometheus` package, or set PROMTOOL "
                   "(.ci/run extracts it)")
    return found


def test_the_rules_are_valid_and_pass_their_tests() -> None:
    for command in (["check", "rules", RULES.name], ["test", "rules", "alerts.test.yml"]):
        run = subprocess.run([_promtool(), *command], cwd=RULES.parent, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


def test_each_rule_queries_exported_series_and_says_what_to_do() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {
        "EventpipeProcessDown", "EventpipeConsumerLagGrowing", "EventpipePartitionNotCommitting",
        "EventpipeDeadLetterQueueGrowing", "EventpipeWorldFailing"}
    exported = exported_series()
    for rule in rules:
        assert promql_metric_names(rule["expr"]) <= exported, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
