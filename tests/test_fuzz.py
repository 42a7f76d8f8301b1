"""Property tests: whatever a user types or a file holds, the answer is a valid object or an
:class:`inpo.errors.InpoError` naming the offending key, row or file — never another exception.

Generated: ``key=value`` overrides of ``inpo run`` and ``inpo train`` (real keys, misspelt keys,
values of every YAML type, NaN and infinities, huge and negative numbers, nesting), YAML config
files (random bytes, Python tags, wrong top-level types), preference-dataset rows (missing
fields, wrong types, chat messages of every shape, non-UTF-8 bytes) and preference matrices
(NaN, out of range, not skew-symmetric, wrong shapes).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inpo.errors import InpoError

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _keys(cls, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) or (t is not None and dataclasses.is_dataclass(t)):
            out += _keys(type(default) if default is not None else t, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _run_keys() -> list[str]:
    from inpo.pipeline.config import RunConfig

    return _keys(RunConfig)


def _train_keys() -> list[str]:
    from inpo.training.config import TrainConfig

    return _keys(TrainConfig)


VALUES = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "nan",
            ".inf",
            "-.inf",
            "null",
            "true",
            "false",
            "[]",
            "{}",
            "[1, 2]",
            "{a: 1}",
            "'x'",
            "",
            "~",
            "0",
            "-1",
            "1e309",
            "!!python/none",
            "[",
            "{",
            "a: b: c",
            "*alias",
            "&anchor x",
            "0x10",
            "1_000",
            "auto",
        ]
    ),
    st.text(max_size=20),
)


def _assert_names(err: InpoError, key: str) -> None:
    msg = str(err)
    assert "\n" not in msg.strip() or "Traceback" not in msg
    parts = key.split(".")
    # the full key, its last part, or (unknown keys) the did-you-mean of the key
    assert key in msg or parts[-1] in msg or parts[0] in msg, (key, msg)


@FUZZ
@given(st.data())
def test_run_overrides_give_a_config_or_an_error_naming_the_key(data):
    from inpo.pipeline.preflight import load_run_config

    keys = _run_keys()
    key = data.draw(st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k + "x")))
    value = data.draw(VALUES)
    try:
        load_run_config(None, [f"{key}={value}"])
    except InpoError as err:
        _assert_names(err, key)


@FUZZ
@given(st.data())
def test_train_overrides_give_a_config_or_an_error_naming_the_key(data):
    from inpo.config import load_config
    from inpo.training.config import TrainConfig

    keys = [k for k in _train_keys() if k not in ("output_dir",)]
    key = data.draw(st.sampled_from(keys))
    value = data.draw(VALUES)
    base = ["output_dir=o", "model.path=m", "data.train_file=d"]
    try:
        load_config(TrainConfig, None, [*base, f"{key}={value}"])
    except InpoError as err:
        _assert_names(err, key)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [
                b"iterations: !!python/object/apply:os.system ['echo x']\n",
                b"- 1\n- 2\n",
                b"just a string\n",
                b"generate: 3\n",
                b"generate: {k: [1, 2]}\n",
                b"\xff\xfe\x00i\x00",
                b"a: &x [*x]\n",
            ]
        ),
    )
)
def test_yaml_files_give_a_config_or_an_error_naming_the_file(tmp_path_factory, raw):
    from inpo.pipeline.preflight import load_run_config

    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(raw)
    try:
        load_run_config(path, [])
    except InpoError as err:
        names = {k.split(".")[0] for k in _run_keys()} | set(_run_keys())
        assert "config.yaml" in str(err) or any(f"'{k}" in str(err) for k in names), str(err)


TEXT = st.text(max_size=12)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "x"]),
            "content": st.one_of(TEXT, st.integers(), st.none()),
        }
    ),
    st.dictionaries(TEXT, TEXT, max_size=2),
    TEXT,
)
FIELD = st.one_of(TEXT, st.lists(MESSAGE, max_size=3), st.integers(), st.none(), st.floats())
ROW = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "tie", "chosen_winrate", "other"]),
    FIELD,
    max_size=6,
)


@FUZZ
@given(st.lists(ROW, min_size=1, max_size=5), st.booleans())
def test_dataset_rows_load_or_an_error_names_the_line(tmp_path_factory, rows, corrupt):
    from inpo.data import load_preference_dataset

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    if corrupt:
        lines[-1] = lines[-1][:-1] + b"\xff}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        load_preference_dataset(path)
    except InpoError as err:
        # a JSONL file's row is named by its line (1-based, as editors count)
        assert "pairs.jsonl" in str(err) and "line " in str(err), str(err)


@FUZZ
@given(
    st.integers(min_value=0, max_value=4).flatmap(
        lambda n: st.lists(
            st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n * n, max_size=n * n
        ).map(lambda xs, n=n: np.array(xs, dtype=np.float64).reshape(n, n))
    )
)
def test_preference_matrices_are_valid_or_refused(matrix):
    from inpo.oracles.synthetic import validate_preference_matrix

    try:
        p = validate_preference_matrix(matrix)
    except InpoError:
        return
    p = np.asarray(p)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    assert np.allclose(p + p.T, 1.0, atol=1e-6)
    assert not math.isnan(float(p.sum()))


@pytest.mark.parametrize("value", ["nan", ".inf", "-1", "0"])
def test_a_few_known_bad_numbers_name_their_key(value):
    from inpo.pipeline.preflight import load_run_config

    for key in (
        "eta",
        "train.optim.learning_rate",
        "generate.temperature",
        "train.optim.warmup_ratio",
    ):
        try:
            load_run_config(None, [f"{key}={value}"])
        except InpoError as err:
            assert key in str(err), (key, value, str(err))
