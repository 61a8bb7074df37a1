"""The token rule: what is sent and accepted, and the three states of a rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubeforge import tokens
from kubeforge.tokens import PROMOTED, STAGED, RotationError, Tokens


def test_no_token_means_no_check() -> None:
    assert Tokens().allows(None)
    assert Tokens().line == b""
    assert tokens.static(None) == Tokens()


def test_a_static_token_is_sent_and_accepted_and_keys_the_sessions() -> None:
    t = tokens.static("abc")
    assert t.line == b"authorization: Bearer abc\r\n"
    assert t.allows(b"Bearer abc")
    assert not t.allows(b"Bearer abd")
    assert not t.allows(None)
    assert t.session_key == "abc"


def test_the_secret_data_gives_send_accept_and_session_key() -> None:
    t = tokens.from_secret({"token": "new\n", "accept": "old\n", "session-key": "k"})
    assert t.send == "new"
    assert t.accept == ("new", "old")
    assert t.allows(b"Bearer old") and t.allows(b"Bearer new")
    assert t.session_key == "k"
    # A Secret from before session keys: the token keys the sessions, as it always did.
    assert tokens.from_secret({"token": "old"}).session_key == "old"


def test_the_digest_changes_with_any_token_and_only_then() -> None:
    a = tokens.from_secret({"token": "a", "session-key": "k"})
    assert a.digest == tokens.from_secret({"token": "a", "session-key": "k"}).digest
    assert a.digest != tokens.from_secret({"token": "a", "accept": "b", "session-key": "k"}).digest
    assert a.digest != tokens.from_secret({"token": "b", "session-key": "k"}).digest
    assert len(a.digest) == 12


def test_a_rotation_stages_promotes_then_drops_the_old_token() -> None:
    steps = tokens.rotation({"token": "old", "session-key": "k"}, "new")
    assert steps == [
        {"token": "old", "accept": "new", "session-key": "k", "rotation": STAGED},
        {"token": "new", "accept": "old", "session-key": "k", "rotation": PROMOTED},
        {"token": "new", "session-key": "k"},
    ]


def test_a_rotation_keeps_the_session_key_of_a_secret_that_had_none() -> None:
    steps = tokens.rotation({"token": "old"}, "new")
    assert {s["session-key"] for s in steps} == {"old"}


@pytest.mark.parametrize("new", ["", "old", "has space"])
def test_a_bad_new_token_is_refused(new: str) -> None:
    with pytest.raises(RotationError):
        tokens.rotation({"token": "old"}, new)


def test_a_rotation_cut_off_goes_on_to_the_token_it_staged() -> None:
    staged = {"token": "old", "accept": "mid", "session-key": "k", "rotation": STAGED}
    steps = tokens.rotation(staged, "ignored")
    assert [s["token"] for s in steps] == ["mid", "mid"]
    promoted = {"token": "mid", "accept": "old", "session-key": "k", "rotation": PROMOTED}
    assert tokens.rotation(promoted, "ignored") == [{"token": "mid", "session-key": "k"}]


def test_every_sender_is_understood_by_every_receiver_that_can_coexist_with_it() -> None:
    """Each state is written once every pod has loaded the one before, so pods are at most one
    state apart: each one's sent token must be accepted by its neighbours."""
    first = {"token": "old", "session-key": "k"}
    states = [tokens.from_secret(d) for d in [first, *tokens.rotation(first, "new")]]
    for n, sender in enumerate(states):
        for receiver in states[max(n - 1, 0) : n + 2]:
            assert receiver.allows(sender.header), (n, sender, receiver)
    assert not states[-1].allows(states[0].header)  # and the old token ends


def test_token_files_are_read_through_the_kubelets_data_link(tmp_path: Path) -> None:
    version = tmp_path / "..2026_12_06"
    version.mkdir()
    (version / "token").write_text("t1")
    (version / "session-key").write_text("k")
    (tmp_path / "..data").symlink_to(version.name)
    (tmp_path / "token").symlink_to("..data/token")
    (tmp_path / "session-key").symlink_to("..data/session-key")
    assert tokens.read_dir(tmp_path) == Tokens("t1", ("t1",), "k")
    env = {tokens.ENV_DIR: str(tmp_path), tokens.ENV_TOKEN: "ignored"}
    assert tokens.from_environ(env) == (Tokens("t1", ("t1",), "k"), tmp_path)
    assert tokens.from_environ({tokens.ENV_TOKEN: "x"}) == (tokens.static("x"), None)


def test_a_rotation_waits_for_every_router_and_replica_in_status() -> None:
    from kubeforge.rotate import lagging

    status = {
        "routers": {"r-1": {"tokenDigest": "d2"}, "r-2": {"tokenDigest": "d1"}},
        "metrics": {
            "replicas": [
                {"name": "p-0", "state": "HEALTHY", "tokenDigest": "d2"},
                {"name": "p-1", "state": "UNHEALTHY", "tokenDigest": "d1"},
            ]
        },
    }
    assert lagging(status, "d2") == ["router r-2", "replica p-1 (UNHEALTHY)"]
    assert lagging({}, "d2") == ["no router has reported yet"]
    status["routers"]["r-2"]["tokenDigest"] = "d2"
    status["metrics"]["replicas"][1]["tokenDigest"] = "d2"
    assert lagging(status, "d2") == []
