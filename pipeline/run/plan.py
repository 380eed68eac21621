"""The plan of a run: the checks made before anything is sent, and the triage of manifest rows against
the ledger into the ``RowTask``s that still need work.

Shared by every command that has to know what a run would do (``run``, ``retry``, ``estimate``,
``validate``) and by every engine, so that they all count rows the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.request import answer_params_digest, input_digest, render_prompt
from pipeline.core.results import RESULT_COLUMNS
from pipeline.core.targets import RemotePath
from pipeline.edges.files import location_exists
from pipeline.edges.ledger import ItemState, StateStore
from pipeline.edges.manifest import ManifestInfo, Row
from pipeline.edges.tables import manifest_reader
from pipeline.edges.tls import check_tls_files

Fingerprint = Callable[[str, Path | str], str]


@dataclass(slots=True)
class RowTask:
    """One manifest row that needs work, with its rendered prompt."""

    row: Row
    prompt: str
    digest: str  # input digest: unchanged inputs => unchanged digest


@dataclass
class TriageCounts:
    """Why rows are (or are not) in the run, counted as the manifest is read."""

    new: int = 0  # never seen by the ledger
    changed: int = 0  # image, prompt or parameters changed since their last outcome
    resumed: int = 0  # pending from an earlier run that stopped (or re-queued by retry)
    retried: int = 0  # failed earlier for a reason that may pass now
    skipped: int = 0  # unchanged and already finished (ok or failed)


class Plan:
    """Checks a job's inputs and sorts its manifest rows into work to do and work already done."""

    def __init__(self, config: Config, *, fingerprint: Fingerprint | None = None, table: Any = None) -> None:
        """``fingerprint`` identifies an image cheaply (default: ``image_fingerprint``, one ``stat``);
        ``table`` (a pandas DataFrame or Arrow table) is the manifest in place of ``input.manifest``."""
        self.config = config
        self.reader = manifest_reader(config.input, RESULT_COLUMNS, table,
                                      storage_options=config.storage_options_for("input"))
        self.params = answer_params_digest(config.request, config.images)
        self.counts = TriageCounts()
        self._fingerprint = fingerprint
        self._manifest_ids = hashlib.sha256()  # every row id in order: the manifest as the output sees it

    def check(self) -> ManifestInfo:
        """Everything about the manifest and output that can be checked before a request is sent
        (raises ManifestError/ConfigError)."""
        info = self.reader.check([self.config.request.prompt])
        check_tls_files(self.config)
        self._check_store_images()
        output = self.config.output
        # an object-store output is probed even when it may be overwritten: wrong credentials or a missing
        # bucket are one ObjectStoreError (exit code 2) now, not a failed upload after every row was paid for
        remote = isinstance(output.path, RemotePath)
        exists = (output.if_exists == "error" or remote) and location_exists(
            output.path, self.config.storage_options_for("output"))
        if output.if_exists == "error" and exists:
            raise ConfigError(
                f"output.path {output.path} exists and output.if_exists is 'error'; "
                "move it away or set output.if_exists: overwrite"
            )
        return info

    def _check_store_images(self) -> None:
        """When the first row's image is on an object store, make sure the store takes the job's credentials
        before anything is sent (exit code 2), rather than failing every row one by one. A manifest or
        directory on the store has proved that already, so only other buckets are asked (one HEAD)."""
        from pipeline.edges import storage
        first = next(self.reader.batches(1), [])
        try:
            url = storage.store_location(first[0].path, first[0].base_dir) if first else None
        except PipelineError:
            return  # a row that climbs out of its bucket fails on its own
        source = str(self.reader.source)
        if url is None or (storage.is_url(source) and url.split("/")[2] == source.split("/")[2]):
            return
        storage.check_readable(url, self.config.storage_options_for("input"), where=storage.INPUT_OPTIONS)

    def batches(self) -> Iterator[list[Row]]:
        return self.reader.batches()

    @property
    def manifest_digest(self) -> str:
        """Digest of the row ids triaged so far, in order (the whole manifest once triage is done)."""
        return self._manifest_ids.hexdigest()

    def triage(self, batch: list[Row], store: StateStore | None) -> list[RowTask]:
        """The rows of ``batch`` that need work, counted into ``counts`` by why (new, changed, ...).

        Runs in a thread: one ledger query for the batch and one ``stat`` per row, no image reads.
        """
        ids = self._note_ids(batch)
        return self._tasks(batch, store.item_states(ids) if store is not None else {})

    def triage_unseen(self, batch: list[Row], store: StateStore) -> tuple[list[RowTask], int]:
        """First pass of a two-pass triage: the tasks of the rows the ledger has never seen, and how many
        rows of ``batch`` it left for ``triage_seen``.

        Why two passes: a restart after 200,000 done rows spent ~4 s checking every done row (ledger join,
        ``stat``, digest) before it could send the first new one. Here a known row costs one primary-key
        probe; the second pass checks the known rows (and re-sends those that changed or never finished)
        after the new ones are queued. Which rows run, and why, is the same as ``triage``; only the order
        in which they are sent differs.
        """
        ids = self._note_ids(batch)
        known = store.known_rows(ids)
        unseen = [row for row in batch if row.id not in known] if known else batch
        return self._tasks(unseen, {}), len(batch) - len(unseen)

    def triage_seen(self, batch: list[Row], store: StateStore, run_id: int) -> list[RowTask]:
        """Second pass: ``triage`` for the rows the first pass left. A row the ledger did not know then
        is either still queued (not in the ledger yet) or written by this run (``run_id``): skipped here.
        The manifest's ids are not noted again (the first pass saw them all, in order)."""
        states = store.item_states([row.id for row in batch])
        earlier = [row for row in batch if (state := states.get(row.id)) is not None and state.run_id != run_id]
        return self._tasks(earlier, states)

    def _note_ids(self, batch: list[Row]) -> list[str]:
        ids = [row.id for row in batch]
        self._manifest_ids.update("\0".join(ids).encode())
        self._manifest_ids.update(b"\1")
        return ids

    def _tasks(self, batch: list[Row], states: dict[str, ItemState]) -> list[RowTask]:
        """The rows of ``batch`` that need work given their ledger ``states`` (absent: new), counted."""
        params = self.params
        template, counts = self.config.request.prompt, self.counts
        tasks = []
        for row, image in zip(batch, self._fingerprints(batch), strict=True):
            prompt = row.prompt or render_prompt(template, row.columns)
            digest = input_digest(params, image, prompt)
            state = states.get(row.id)
            if state is None:
                counts.new += 1
            elif state.input_digest != digest:
                counts.changed += 1
            elif state.settled:
                counts.skipped += 1
                continue
            elif state.status == "failed":
                counts.retried += 1
            else:
                counts.resumed += 1
            tasks.append(RowTask(row, prompt, digest))
        return tasks

    def _fingerprints(self, batch: list[Row]) -> list[str]:
        """Each row's image identity: the row's own (a table's image bytes: their sha256), else the given
        ``fingerprint`` per row, else ``images.fingerprints`` for the batch (one ``stat`` per local file; objects
        on a store asked together, or read from the listing)."""
        pending = [row for row in batch if row.fingerprint is None]
        if self._fingerprint is not None:
            computed = iter([self._fingerprint(row.path, row.base_dir) for row in pending])
        else:
            # imported here: checking a manifest (validate) needs neither aiohttp nor Pillow
            from pipeline.edges.images import fingerprints

            computed = iter(fingerprints([(row.path, row.base_dir) for row in pending],
                                         self.config.storage_options_for("input"), limit=self.config.store_reads)
                            if pending else [])
        return [row.fingerprint if row.fingerprint is not None else next(computed) for row in batch]
