from saber_sidecar.reload import ConfigWatcher

GOOD = "classes:\n  - name: a\n    deadline_seconds: 2\ndefault_class: a\n"
GOOD2 = "classes:\n  - name: a\n    deadline_seconds: 2\n  - name: b\n    deadline_seconds: 9\ndefault_class: b\n"
BAD = "classes:\n  - name: a\n    deadline_seconds: -1\ndefault_class: a\n"


def test_reload_applies_good_refuses_bad_and_follows_symlink_swaps(tmp_path):
    applied, results = [], []
    (tmp_path / "v1").write_text(GOOD)
    link = tmp_path / "config.yaml"
    link.symlink_to(tmp_path / "v1")
    w = ConfigWatcher(link, applied.append, results.append, initial_text=GOOD)
    assert w.check() is None  # unchanged content

    # A ConfigMap update: the link is swapped to new content; the mtime of the link target may not move.
    (tmp_path / "v2").write_text(BAD)
    link.unlink()
    link.symlink_to(tmp_path / "v2")
    assert w.check() == "failure"
    assert "deadline_seconds" in w.last_error
    assert w.check() is None  # the same bad content is refused once, not every poll
    assert applied == []

    (tmp_path / "v3").write_text(GOOD2)
    link.unlink()
    link.symlink_to(tmp_path / "v3")
    assert w.check() == "success"
    assert [c.default_class for c in applied] == ["b"]
    assert results == ["failure", "success"]


def test_missing_file_is_a_failure_once(tmp_path):
    results = []
    w = ConfigWatcher(tmp_path / "absent.yaml", lambda c: None, results.append)
    assert w.check() == "failure"
    assert w.check() is None
    assert "cannot read" in w.last_error
