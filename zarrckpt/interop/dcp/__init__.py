"""``torch.distributed.checkpoint`` storage plug-ins that read and write zarrckpt checkpoints.

``dcp.save(sd, storage_writer=ZarrStorageWriter(path))`` (and ``dcp.async_save``)
writes exactly the checkpoint ``zarrckpt.save`` writes: one zarr v3 array per
global tensor, chunk grid = shard grid, crc32c on every chunk, JSON metadata,
commit marker, atomic publish. ``dcp.load(sd, storage_reader=ZarrStorageReader(path))``
loads any zarrckpt checkpoint, whoever wrote it, reading only the (inner)
chunks each rank needs. DCP's ``.metadata`` pickle is never written nor read.

How the DCP hooks map onto zarrckpt:

* :meth:`ZarrStorageWriter.prepare_global_plan` (coordinator) turns every
  rank's ``WriteItem`` (already deduplicated by DCP's planner) into
  :class:`~zarrckpt.parallel._planning.ArrayPieces`, plans the chunk grids and the
  writer of each chunk with :func:`~zarrckpt.parallel._planning.plan_arrays` (the same
  planning ``zarrckpt.save`` uses), creates the staging directory and puts each
  rank's share (staging path, array records, chunk assignments) into its
  plan's ``storage_data``.
* :meth:`ZarrStorageWriter.write_data` (every rank) resolves its items with
  ``planner.resolve_data`` and writes its array metadata and chunks into the
  staging directory; a ``BYTE_IO`` item (a non-tensor leaf, ``torch.save``'d by
  DCP) is loaded back with ``torch.load(weights_only=True)`` and stored as JSON
  tree nodes (tensors inside it, e.g. in a tuple, become arrays; other objects
  need ``allow_pickle=True``).
* :meth:`ZarrStorageWriter.finish` (coordinator) rebuilds the state-dict tree
  from DCP's metadata and flattening mappings, writes the root ``zarr.json``
  with the manifest and the commit marker, and publishes atomically.
* :meth:`ZarrStorageReader.read_metadata` builds DCP's ``Metadata`` from the
  manifest: a ``TensorStorageMetadata`` per array listing its stored chunks,
  ``BytesStorageMetadata`` for every other leaf *at the keys DCP's flattening
  produces* (e.g. one key for a list of plain values, one per element of a
  list holding tensors; see :mod:`zarrckpt.interop.dcp._tree`).
* :meth:`ZarrStorageReader.read_data` reads each requested region of a stored
  chunk with zarrckpt's verified reader, straight into the target when
  possible, and serves ``BYTE_IO`` items by ``torch.save``-ing the stored
  JSON value for ``planner.load_bytes``.

Like DCP's ``FileSystemWriter``, the writer creates missing parent
directories, writes into an existing directory and keeps the files already
there (committed in place, commit marker last: :mod:`zarrckpt.storage._inplace`),
and with ``overwrite=False`` refuses an existing checkpoint with DCP's words
("Checkpoint already exists"). Differences: ``overwrite`` defaults to False
(like ``zarrckpt.save``; FileSystemWriter overwrites by default); replacing
a checkpoint that has its directory to itself is atomic (the old checkpoint
stays readable until the new one is committed); a directory holding a DCP
checkpoint is refused rather than mixed with it.

On an object store (``s3://bucket/prefix``, with ``storage_options``) the
writer uses the store's staging: the coordinator creates it with
``Store.stage`` (clearing the prefix, docs/object-storage.md), the other
ranks attach to it by its token (``Store.attach``) and write one object per
chunk piece, and ``finish`` commits it (commit marker last).
"""
