"""What TFF's executor inherits: an allow-list, never a FLAAP_MQ_* variable (pure logic)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flaap_mq.executor.environment import EXECUTOR_ENV, minimal_environment

NAMES = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=30)


def test_only_the_allow_list_passes():
    source = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OMP_NUM_THREADS": "2",
        "FLAAP_MQ_BROKER_URL": "amqp://silo:secret@broker/",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "HOME": "/home/silo",
        "PYTHONPATH": "/somewhere",
    }
    assert minimal_environment(source) == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OMP_NUM_THREADS": "2",
    }


def test_an_operator_names_more_but_never_a_flaap_mq_variable():
    source = {
        EXECUTOR_ENV: "CUDA_VISIBLE_DEVICES, FLAAP_MQ_BROKER_URL,MY_SETTING",
        "CUDA_VISIBLE_DEVICES": "0",
        "MY_SETTING": "x",
        "FLAAP_MQ_BROKER_URL": "amqp://silo:secret@broker/",
    }
    env = minimal_environment(source)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["MY_SETTING"] == "x"
    assert not [name for name in env if name.startswith("FLAAP_MQ_")]


def test_a_path_is_always_there():
    assert "PATH" in minimal_environment({})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(NAMES, st.text(max_size=20)), st.lists(NAMES, max_size=5))
def test_no_flaap_mq_variable_ever_passes(source, named):
    source = {**source, EXECUTOR_ENV: ",".join(named), "FLAAP_MQ_SECRET": "s"}
    assert not [name for name in minimal_environment(source) if name.startswith("FLAAP_MQ_")]
