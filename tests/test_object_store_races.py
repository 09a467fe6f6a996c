"""Two saves to one object-store prefix at once, at the interleavings that used
to lose a checkpoint silently: whatever the order of their requests, each save
either committed a checkpoint that stays loadable or raised; no save returns
normally for a checkpoint that another save then deletes. (An object store has
no rename: the save record ``~commit/saving.json`` is the claim on the prefix,
see docs/format.md section 6.)"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bits_equal

import zarrckpt
from zarrckpt.errors import CheckpointExistsError
from zarrckpt.format._marker import COMMIT_MARKER
from zarrckpt.storage import _object_staging
from zarrckpt.storage._object import SAVE_RECORD, ObjectStore


def test_a_save_that_starts_after_a_commit_it_did_not_see_deletes_nothing(s3_server, s3_url):
    """Save B passed its overwrite=False check before save A committed; B must not
    clear A's checkpoint when it claims the prefix."""
    opts = s3_server.options()
    late = ObjectStore(s3_url, opts)
    late.check_writable(overwrite=False)  # nothing there yet
    sd = {"w": torch.randn(40, 3)}
    zarrckpt.save(sd, s3_url, storage_options=opts)  # A commits meanwhile
    with pytest.raises(CheckpointExistsError, match="just before this one started"):
        late.stage(overwrite=False)
    assert not late.exists(SAVE_RECORD)  # B took its claim back
    out = {"w": torch.zeros(40, 3)}
    zarrckpt.load(out, s3_url, storage_options=opts)
    assert_bits_equal(sd["w"], out["w"])


def test_a_save_overtaken_during_its_commit_raises(s3_server, s3_url, monkeypatch):
    """Save B claims the prefix (and clears it) right after save A wrote its marker:
    A must raise, not report a checkpoint that B deletes."""
    opts = s3_server.options()
    real_put = _object_staging.ObjectStaging._put
    started: list[object] = []

    def put(self, key, data, *, create=False):
        real_put(self, key, data, create=create)
        if key == COMMIT_MARKER and not started:
            started.append(ObjectStore(s3_url, opts).stage(overwrite=True))

    monkeypatch.setattr(_object_staging.ObjectStaging, "_put", put)
    with pytest.raises(CheckpointExistsError, match="started while this one was committing"):
        zarrckpt.save({"w": torch.ones(8)}, s3_url, storage_options=opts)
    assert started  # B's save is under way: it owns the prefix, A left it alone
    store = ObjectStore(s3_url, opts)
    assert not store.exists(COMMIT_MARKER)
    assert store.exists(SAVE_RECORD)


def test_a_save_that_claims_the_prefix_first_makes_the_other_fail_at_commit(
    s3_server, s3_url, monkeypatch
):
    """Save B starts while save A writes its chunks: A raises at commit without
    deleting anything of B's, and B commits."""
    opts = s3_server.options()
    real_commit = _object_staging.ObjectStaging.commit
    other = {"w": torch.arange(6.0)}

    def commit(self, *args, **kwargs):
        monkeypatch.setattr(_object_staging.ObjectStaging, "commit", real_commit)
        zarrckpt.save(other, s3_url, storage_options=opts, overwrite=True)  # B, start to end
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(_object_staging.ObjectStaging, "commit", commit)
    with pytest.raises(CheckpointExistsError, match="another save to it started"):
        zarrckpt.save({"w": torch.ones(6)}, s3_url, storage_options=opts, overwrite=True)
    out = {"w": torch.zeros(6)}
    zarrckpt.load(out, s3_url, storage_options=opts)
    assert_bits_equal(other["w"], out["w"])
