"""The run-config schema: unknown keys at every level, types, ranges, defaults, overrides."""

import pytest

from histosr.config import ConfigError, apply_overrides, parse_assignments, validate

BASE = {"section": {"reader": "her2st", "path": "x", "name": "C2"}}


def _err(extra):
    with pytest.raises(ConfigError) as e:
        validate({**BASE, **extra})
    return str(e.value)


@pytest.mark.parametrize("extra, words", [
    ({"method": {"parms": {}}}, ["method.parms", "did you mean 'params'"]),
    ({"genes": {"ntop": 5}}, ["genes.ntop", "did you mean 'n_top'"]),
    ({"predict": {"preview": ["A"]}}, ["predict.preview", "did you mean 'previews'"]),
    ({"outptus": {}}, ["'outptus'", "did you mean 'outputs'"]),
    ({"section": {"reader": "her2st", "path": "x", "nmae": "C2"}},
     ["reader 'her2st' has no option 'nmae'", "did you mean 'name'"]),
    ({"section": {"reader": "visum", "path": "x"}}, ["unknown reader 'visum'",
                                                      "did you mean 'visium'"]),
    ({"features": {"encoder": "handcraftd"}}, ["unknown encoder", "did you mean 'handcrafted'"]),
    ({"features": {"h_low": 0.3}}, ["encoder 'handcrafted' has no parameter 'h_low'",
                                     "did you mean 'h_lo'"]),
    ({"method": {"name": "istr"}}, ["unknown method 'istr'", "did you mean 'istar'"]),
    ({"method": {"params": {"epoch": 3}}}, ["has no parameter 'epoch'",
                                             "did you mean 'epochs'"]),
    ({"method": {"params": {"epochs": -3}}},
     ["the 'epochs' parameter of istar must be an int >= 1, got -3"]),
    ({"genes": {"n_top": "many"}}, ["genes.n_top", "integer"]),
    ({"genes": {"min_frac": 2}}, ["genes.min_frac", "less than or equal to 1"]),
    ({"seed": -1}, ["seed", "greater than or equal to 0"]),
])
def test_mistakes_are_named_with_the_nearest_key(extra, words):
    msg = _err(extra)
    assert msg.startswith("config:")
    for w in words:
        assert w in msg, msg


def test_defaults_filled_in_one_place():
    cfg = validate(BASE)
    assert cfg.method.name == "istar" and cfg.method.consistency is True
    assert (cfg.genes.n_top, cfg.genes.min_frac, cfg.seed) == (1000, 0.1, 0)
    assert cfg.features.encoder == "handcrafted" and cfg.outputs.spatialdata is False
    assert validate({"section": {"path": "x"}}).section.reader is None  # detected at read


def test_set_overrides_with_dotted_keys():
    sets = parse_assignments(["method.params.epochs=20", "genes.n_top=50", "section.name=C3"])
    cfg = validate(apply_overrides(BASE, sets))
    assert cfg.genes.n_top == 50 and cfg.method.params == {"epochs": 20}
    assert cfg.section.name == "C3" and BASE["section"]["name"] == "C2"  # input untouched
    with pytest.raises(ConfigError, match="has no parameter 'epochs'"):
        validate(apply_overrides(BASE, parse_assignments(["method.name=knn",
                                                          "method.params.epochs=3"])))
    with pytest.raises(ConfigError, match="is not a mapping"):
        apply_overrides({**BASE, "seed": 0}, {"seed.x": 1})


def test_run_rejects_a_bad_config_before_reading(tmp_path, capsys):
    from histosr.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("section: {reader: her2st, path: /nonexistent, name: C2}\n"
                 "method: {name: istar, parms: {epochs: 3}}\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'params'" in err and "Traceback" not in err
