"""Incremental runs: skip (item, task) pairs that earlier runs already answered.

A task result is reusable when the item's content, the task, the model, the
prompt version and the task's fingerprint (its definition and the values the
item fills into its instruction: `tasks.task.TaskFingerprints`) are
all the same (`answer_key`), whatever the file is called now or which run
produced it: raising `--max_tokens ocr=...` re-runs OCR and nothing else.
Results written before fingerprints existed have none and are never reused.
With `--incremental_from`, the decode units pass through `AttachAnswers` on
their way to `DecodeUnits`:

1. Hash pass (`HashUnits`): each unit's bytes are read and its items hashed
   by the walk `DecodeUnits` decodes from (`library.units`: sha256 of the
   file, member or cell, + page), without decoding a pixel; each item's task
   fingerprints are computed from its metadata.
2. Filter (`BuildHashFilter`): the current items' hashes become one Bloom
   filter, ~1.8 bytes per current item, a singleton side input.
3. History scan (`_ScanHistory`): the key columns of the earlier results
   of complete runs only (a run_summary.json beside them; never the run's
   own output), one Parquet row group at a time, as Arrow columns: rows of
   another model or prompt version, and rows whose hash the filter rules
   out, are dropped where they are read, vectorised. What survives is the
   history of the current items plus `FALSE_POSITIVE_RATE` of the rest.
4. Exact join on the content hash (a GroupByKey): each current item's
   answered tasks, by the full key (its own fingerprints). A filter false
   positive finds no item with its hash here, so it can never skip anything.
5. Join on the unit (a GroupByKey): each unit carries its items' answered
   tasks (by item id) to `DecodeUnits`, which skips fully answered items
   before decoding or rendering them and runs only the missing tasks of the others.

Memory per worker does not depend on the size of the history: the filter
(1.8 bytes per current item), one row group's key columns, and one join key's
group at a time (Dataflow groups in its shuffle service). On the local runner
the joins' inputs are held in memory: the current units (as the fan-out
reshuffle holds them anyway) and the surviving history rows. docs/architecture.md
("Incremental runs") states the bound and its sources; BENCHMARKS.md measures it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from engine.api import EngineSettings
from library import metrics
from library.formats import DecodeLimits
from library.metadata import ItemValues
from library.shards import ShardSettings
from library.units import UnitItem, unit_items
from schemas.records import DecodeUnit, RunInfo
from tasks.task import Task, TaskFingerprints
from tasks.text_layer import TextLayerSettings
from transforms.sinks import SUMMARY_FILE
from transforms.text_layer import page_layers, task_routes

# Results columns that identify an answer.
KEY_COLUMNS = ("content_hash", "task", "model_id", "prompt_version", "task_fingerprint")

# 0.1 %: 14.4 bits (1.8 bytes) per current item on every worker, and 1 in 1,000 history rows
# of this model and prompt version survives the scan without being an answer for this input
# (10 M history rows -> ~10 k spurious rows in the join). 1 % would save 0.6 bytes per item
# and let 10x more history through.
FALSE_POSITIVE_RATE = 0.001
MIN_FILTER_BITS = 1024  # an empty or tiny input still gets a filter that rules most rows out

TALLY_TAG = "tally"
_UNIT, _ANSWER = 0, 1  # tags of the two sides of a join


def answer_key(content_hash: str, task: str, model_id: str, prompt_version: str, task_fingerprint: str) -> tuple[str, ...]:
    """The identity of one answer: the same key means the earlier answer is this run's answer.

    The one place an answer's key is built, for history rows (`KEY_COLUMNS`)
    and current items (`current_key`) alike.
    """
    return (content_hash, task, model_id, prompt_version, task_fingerprint)


def run_fields(run: RunInfo) -> dict[str, str]:
    """Key columns whose value is the same for every answer of this run (the history scan filters on them)."""
    return {"model_id": run.model_id, "prompt_version": run.prompt_version}


def current_key(content_hash: str, task: str, task_fingerprint: str, run: RunInfo) -> tuple[str, ...]:
    return answer_key(content_hash=content_hash, task=task, task_fingerprint=task_fingerprint, **run_fields(run))


def answered_tasks(
    content_hash: str, fingerprints: Mapping[str, str], earlier: Iterable[tuple[str, ...]], run: RunInfo
) -> tuple[str, ...]:
    """The tasks (`fingerprints`: task -> the item's fingerprint) whose answer for `content_hash` is among the `earlier` keys."""
    keys = set(earlier)
    return tuple(task for task, fingerprint in fingerprints.items() if current_key(content_hash, task, fingerprint, run) in keys)


def results_pattern(location: str) -> str:
    return f"{location.rstrip('/')}/results/*.parquet"


def run_location(results_file: str) -> str:
    """`gs://b/nightly/d1/results/part-0.parquet` -> `gs://b/nightly/d1`."""
    return results_file.rsplit("/results/", 1)[0]


class _CompleteRunsOnly(beam.DoFn):
    """Result files of complete runs only (a run_summary.json beside them), never those under `own`."""

    def __init__(self, own: str):
        self._own = own
        self._complete: dict[str, bool] = {}

    def process(self, meta: Any) -> Iterator[str]:
        if meta.path.startswith(self._own):
            return
        location = run_location(meta.path)
        if location not in self._complete:
            self._complete[location] = FileSystems.exists(f"{location}/{SUMMARY_FILE}")
        if self._complete[location]:
            yield meta.path


def unit_key(unit: DecodeUnit) -> str:
    """Identity of a decode unit within one run (what the second join groups on)."""
    return f"{unit.uri}\x1f{unit.kind}\x1f{unit.first_page}\x1f{unit.member or ''}"


# ---------------------------------------------------------------- the filter

_HEX_DIGITS = 64  # sha256 hexdigest, as library.units computes content_hash
_WORD_DIGITS = 16  # the filter probes from the hash's first 64 bits


def words_of(content_hash: str) -> bytes:
    """The 8 bytes of a hash the filter uses (current items' side)."""
    return bytes.fromhex(content_hash[:_WORD_DIGITS])


def hash_words(hashes: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Arrow strings -> (has a digest's length, the 64-bit word `words_of` gives); vectorised, no Python per row.

    Nulls and other lengths cannot be a current item's hash: ruled out. Hex
    digits are decoded as (c & 15) + 9 * (c >> 6), which is exact for 0-9 and
    a-f; other 64-character text gets some words, at worst a false positive,
    which the exact join after the filter rejects.
    """
    if isinstance(hashes, pa.ChunkedArray):
        hashes = hashes.combine_chunks()
    hashes = hashes.cast(pa.string())
    digest_shaped = pc.fill_null(pc.equal(pc.binary_length(hashes), _HEX_DIGITS), False).to_numpy(zero_copy_only=False)
    words = np.zeros(len(hashes), dtype=np.uint64)
    if not digest_shaped.any():
        return digest_shaped, words
    digests = hashes if digest_shaped.all() else hashes.filter(pa.array(digest_shaped))
    offsets = np.frombuffer(digests.buffers()[1], dtype=np.int32)[digests.offset: digests.offset + len(digests) + 1]
    text = np.frombuffer(digests.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    digits = text.reshape(len(digests), _HEX_DIGITS)[:, :_WORD_DIGITS]
    nibbles = (digits & np.uint8(15)) + np.uint8(9) * (digits >> np.uint8(6))
    octets = np.ascontiguousarray((nibbles[:, 0::2] << np.uint8(4)) | nibbles[:, 1::2])
    words[digest_shaped] = octets.view(">u8").astype(np.uint64)[:, 0]
    return digest_shaped, words


@dataclasses.dataclass(frozen=True)
class HashFilter:
    """A Bloom filter of content hashes (Bloom 1970), probed from the digest's own bits (`_probes`).

    Sized by the standard formulas: -n ln p / (ln 2)^2 bits and -log2 p probes
    for n items at false-positive rate p. It answers "maybe" or "no"; the exact
    join after it decides.
    """

    bits: bytes
    num_bits: int
    num_probes: int

    @staticmethod
    def of(words: np.ndarray, false_positive_rate: float, min_bits: int) -> "HashFilter":
        """A filter holding `words` (uint64, one per hash), sized for the distinct ones at `false_positive_rate`."""
        items = len(np.unique(words))
        num_bits = max(min_bits, math.ceil(-items * math.log(false_positive_rate) / math.log(2) ** 2))
        # The probe count that is optimal for the target rate; a filter larger than needed
        # (MIN_FILTER_BITS) only answers "no" more often.
        num_probes = max(1, round(-math.log2(false_positive_rate)))
        bits = np.zeros((num_bits + 7) // 8, dtype=np.uint8)
        for probe in _probes(words, num_bits, num_probes):
            np.bitwise_or.at(bits, probe >> np.uint64(3), (np.uint8(1) << (probe & np.uint64(7)).astype(np.uint8)))
        return HashFilter(bits.tobytes(), num_bits, num_probes)

    def may_contain(self, hashes: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Per hash: False if it is certainly not in the filter."""
        valid, words = hash_words(hashes)
        bits = np.frombuffer(self.bits, dtype=np.uint8)
        result = valid.copy()
        for probe in _probes(words, self.num_bits, self.num_probes):
            result &= ((bits[probe >> np.uint64(3)] >> (probe & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)
        return result

    @property
    def size_bytes(self) -> int:
        return len(self.bits)


_GOLDEN = 0x9E3779B97F4A7C15


def _probes(words: np.ndarray, num_bits: int, num_probes: int) -> Iterator[np.ndarray]:
    """Bit positions of each hash, one array per probe: splitmix64 of (word + i * golden ratio).

    Each probe mixes the hash's first 64 bits anew (Steele, Lea & Flood 2014,
    the splitmix64 finaliser), so the probes are as good as independent hashes
    at any filter size; plain double hashing (h1 + i * h2) lets probe
    sequences overlap when the filter is small. uint64 arithmetic wraps, as intended.
    """
    modulus = np.uint64(num_bits)
    for probe in range(1, num_probes + 1):
        mixed = words + np.uint64(probe * _GOLDEN % 2**64)
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        yield (mixed ^ (mixed >> np.uint64(31))) % modulus


class BuildHashFilter(beam.CombineFn):
    """Content hashes of the current items -> one HashFilter sized for how many there are.

    Accumulators hold the hashes' first 8 bytes (partial combines on every
    worker, merged once), so the filter is sized for the exact count, which is
    not known before the hash pass has run.
    """

    def __init__(self, false_positive_rate: float, min_bits: int):
        self._false_positive_rate = false_positive_rate
        self._min_bits = min_bits

    def create_accumulator(self) -> bytearray:
        return bytearray()

    def add_input(self, accumulator: bytearray, content_hash: str) -> bytearray:
        accumulator += words_of(content_hash)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[bytearray]) -> bytearray:
        merged = bytearray()
        for accumulator in accumulators:
            merged += accumulator
        return merged

    def extract_output(self, accumulator: bytearray) -> HashFilter:
        words = np.frombuffer(bytes(accumulator), dtype=">u8").astype(np.uint64)
        return HashFilter.of(words, self._false_positive_rate, self._min_bits)


# ---------------------------------------------------------------- the stages


@dataclasses.dataclass(frozen=True)
class HashedItem:
    """What the exact join needs of a current item: where it is, and its fingerprint for every task."""

    unit_key: str
    item_id: str
    fingerprints: Mapping[str, str]  # task -> the item's task fingerprint


class HashUnits(beam.DoFn):
    """DecodeUnit -> (content_hash, HashedItem) per item, from its bytes and metadata alone: no pixel is decoded.

    It walks a unit with `library.units.unit_items`, the walk DecodeUnits
    decodes from (same reads, same hashes, the same metadata). Items that
    cannot be read are passed over: DecodeUnits meets them again and reports them once.
    """

    def __init__(
        self, limits: DecodeLimits, shards: ShardSettings, tasks: Sequence[Task], settings: EngineSettings,
        text_layer: TextLayerSettings = TextLayerSettings(mode="model"),
    ):
        self._limits = limits
        self._shards = shards
        self._tasks = tuple(tasks)
        self._fingerprints = TaskFingerprints(tasks, settings)
        self._text_layer = text_layer
        # Only where a layer can change a route are PDF pages' layers read (no pixel either way).
        self._reads_layers = text_layer.reads_layer(tuple(task.text_layer for task in tasks))

    def process(self, unit: DecodeUnit) -> Iterator[tuple[str, HashedItem]]:
        key = unit_key(unit)
        entries = list(unit_items(unit, self._limits, self._shards))
        layers = page_layers(entries) if self._reads_layers else {}
        for entry in entries:
            if isinstance(entry, UnitItem):
                values = ItemValues(entry.metadata)
                # Each task's fingerprint of the route it takes on this item: the key its row will carry.
                routes = task_routes(self._text_layer, self._tasks, layers.get(entry.ref.item_id), entry.content_hash)
                fingerprints = {task: self._fingerprints.of(task, values, chosen) for task, chosen in routes.items()}
                yield entry.content_hash, HashedItem(key, entry.ref.item_id, fingerprints)


class _ScanHistory(beam.DoFn):
    """One row group of earlier results' key columns -> (content_hash, answer key) of rows this input may reuse.

    Whole columns at a time (Arrow compute and numpy): the history is read once
    per run and only its survivors become Python objects.
    """

    def __init__(self, run: RunInfo):
        self._run = run

    def process(self, table: pa.Table, current: HashFilter) -> Iterator[Any]:
        if not set(KEY_COLUMNS) <= set(table.column_names):
            # Results written before a key column existed (task fingerprints): never this run's answer.
            metrics.count("history_rows", table.num_rows)
            yield pvalue.TaggedOutput(TALLY_TAG, {"history_rows": table.num_rows, "history_candidates": 0})
            return
        same_run = pa.array(np.ones(table.num_rows, dtype=bool))
        for column, value in run_fields(self._run).items():
            same_run = pc.and_(same_run, pc.fill_null(pc.equal(table[column], value), False))
        rows = table.filter(same_run)
        candidates = rows.filter(pa.array(current.may_contain(rows["content_hash"])))
        metrics.count("history_rows", table.num_rows)
        metrics.count("history_candidates", candidates.num_rows)
        yield pvalue.TaggedOutput(TALLY_TAG, {"history_rows": table.num_rows, "history_candidates": candidates.num_rows})
        for row in candidates.select(list(KEY_COLUMNS)).to_pylist():
            yield row["content_hash"], answer_key(**row)


def _tagged(values: Iterable[tuple[int, Any]], tag: int) -> Iterator[Any]:
    return (value for value_tag, value in values if value_tag == tag)


class _AnswersPerUnit(beam.DoFn):
    """(content_hash, items holding it + earlier answer keys for it) -> (unit key, (item id, answered tasks)).

    Reads the group twice (answers, then items) instead of holding it: a
    grouped iterable may be larger than memory on Dataflow and is re-iterable.
    Items of one content are told apart by their fingerprints (their metadata
    may ask them different questions).
    """

    def __init__(self, run: RunInfo):
        self._run = run

    def process(self, group: tuple[str, Iterable[tuple[int, Any]]]) -> Iterator[tuple[str, tuple[str, tuple[str, ...]]]]:
        content_hash, values = group
        earlier = set(_tagged(values, _ANSWER))
        if not earlier:
            return
        for item in _tagged(values, _UNIT):
            done = answered_tasks(content_hash, item.fingerprints, earlier, self._run)
            if done:
                yield item.unit_key, (item.item_id, done)


def _unit_with_answers(group: tuple[str, Iterable[tuple[int, Any]]]) -> Iterator[DecodeUnit]:
    """(unit key, the unit + its items' answered tasks) -> the unit carrying them."""
    _, values = group
    answered = tuple(sorted(dict(_tagged(values, _ANSWER)).items()))
    for unit in _tagged(values, _UNIT):
        yield dataclasses.replace(unit, answered=answered)


def _join(label: str, units: beam.PCollection, answers: beam.PCollection) -> beam.PCollection:
    """Two keyed collections -> (key, [(tag, value), ...]) groups, tagged by side."""
    return (
        (
            units | f"Tag{label}Units" >> beam.MapTuple(lambda key, value: (key, (_UNIT, value))),
            answers | f"Tag{label}Answers" >> beam.MapTuple(lambda key, value: (key, (_ANSWER, value))),
        )
        | f"Flatten{label}" >> beam.Flatten()
        | f"Group{label}" >> beam.GroupByKey()
    )


class AttachAnswers(beam.PTransform):
    """DecodeUnits -> (the same units carrying their items' answered tasks, tallies of the history scan).

    Only complete runs count as history: a location without results (e.g.
    yesterday's run failed) or without run_summary.json (killed, possibly
    while publishing, and cleared when rerun) contributes nothing. Files
    under `output` are never read: a glob such as `gs://b/nightly/*` also
    matches tonight's own output.
    """

    def __init__(
        self, locations: Sequence[str], run: RunInfo, tasks: Sequence[Task], settings: EngineSettings, limits: DecodeLimits,
        shards: ShardSettings, output: str, text_layer: TextLayerSettings = TextLayerSettings(mode="model"),
    ):
        super().__init__()
        self._text_layer = text_layer
        self._patterns = [results_pattern(location) for location in locations]
        self._run = run
        self._own = output.rstrip("/") + "/"
        self._tasks = tuple(tasks)
        self._settings = settings
        self._limits = limits
        self._shards = shards

    def expand(self, units: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        hashes = units | "HashItems" >> beam.ParDo(HashUnits(self._limits, self._shards, self._tasks, self._settings, self._text_layer))
        current = (
            hashes
            | "ContentHashes" >> beam.Keys()
            | "CurrentItemsFilter" >> beam.CombineGlobally(BuildHashFilter(FALSE_POSITIVE_RATE, MIN_FILTER_BITS))
        )
        scanned = (
            units.pipeline
            | "EarlierResults" >> beam.Create(self._patterns)
            | "MatchResults" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "CompleteRuns" >> beam.ParDo(_CompleteRunsOnly(self._own))
            | "ReadKeyColumns" >> beam.io.ReadAllFromParquetBatched(columns=list(KEY_COLUMNS))
            | "ScanHistory" >> beam.ParDo(_ScanHistory(self._run), current=pvalue.AsSingleton(current)).with_outputs(
                TALLY_TAG, main="answers"
            )
        )
        per_unit = _join("ByHash", hashes, scanned.answers) | "AnswersPerUnit" >> beam.ParDo(_AnswersPerUnit(self._run))
        keyed_units = units | "KeyUnits" >> beam.Map(lambda unit: (unit_key(unit), unit))
        attached = _join("ByUnit", keyed_units, per_unit) | "UnitsWithAnswers" >> beam.FlatMap(_unit_with_answers)
        return attached, scanned[TALLY_TAG]
