"""``deepfeat load | sync | search | collections``: the Milvus commands.

Each handler parses its options, calls one connector function and prints its report; the connectors (and with
them pymilvus and torch) are imported when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfeat.finetune.errors import DataError
from deepfeat.recipes.cli.arguments import int_at_least, json_object, out_file, positive_float, workers
from deepfeat.recipes.cli.connection import add_connection_args, connect_from_args

if TYPE_CHECKING:
    import numpy as np

    from deepfeat.finetune.models.bundle import ModelBundle

__all__ = ["S3_ACCESS_ENV", "S3_SECRET_ENV", "add_cli", "read_vector_file"]

S3_ACCESS_ENV = "DEEPFEAT_S3_ACCESS_KEY"
S3_SECRET_ENV = "DEEPFEAT_S3_SECRET_KEY"


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _print_report(data: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        _print_json(data)
        return
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, list) and not v:
            continue
        print(f"{k.ljust(width)}  {v}")


# --------------------------------------------------------------------------------------------------
# load


def _cmd_load(args: argparse.Namespace) -> int:
    from deepfeat.connectors.bulk import BulkStaging, bulk_import_shards
    from deepfeat.connectors.load import load_shards

    conn = connect_from_args(args)
    try:
        if args.bulk_import:
            staging = BulkStaging(local_dir=args.staging_dir, s3_endpoint=args.s3_endpoint, s3_bucket=args.s3_bucket,
                                  remote_path=args.s3_path, s3_access_key=os.environ.get(S3_ACCESS_ENV),
                                  s3_secret_key=os.environ.get(S3_SECRET_ENV), s3_secure=args.s3_secure)
            report = bulk_import_shards(conn, args.collection, args.shards, staging=staging, bundle=args.bundle,
                                        index=args.index, key=args.key, state_path=args.state,
                                        progress=not args.no_progress, timeout=args.import_timeout)
        else:
            report = load_shards(conn, args.collection, args.shards, bundle=args.bundle, index=args.index,
                                 key=args.key, batch_rows=args.batch_rows, state_path=args.state,
                                 resume=not args.restart, progress=not args.no_progress, verify=not args.no_verify,
                                 exclude_columns=_csv(args.exclude_columns) or ())
    finally:
        conn.close()
    _print_report(report.to_dict(), args.format)
    return 0


def _add_load(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "load",
        help="load embedding shards (from 'deepfeat embed') into a Milvus collection",
        description="Upsert Parquet shards into a collection (created from the shards' model bundle): "
        "no duplicates on re-run, resumable after a crash, count checked at the end.",
    )
    p.add_argument("shards", help="shard directory (part-*.parquet) or one shard file")
    p.add_argument("--collection", "-c", required=True, help="target collection")
    p.add_argument("--bundle", default=None, help="model bundle the shards must come from (checked)")
    p.add_argument("--index", default=None,
                   help="index of a new collection: FLAT, IVF_FLAT, IVF_SQ8, HNSW or AUTOINDEX, with options as "
                        "HNSW:M=32,efConstruction=256 (default AUTOINDEX)")
    p.add_argument("--key", choices=("record_id", "content_hash"), default="record_id",
                   help="derive the primary key from the record id (default) or the image content hash")
    p.add_argument("--batch-rows", type=int_at_least(1), default=2000, help="rows per upsert batch (default 2000)")
    p.add_argument("--state", default=None, help="resume state file (default: in the shard directory)")
    p.add_argument("--restart", action="store_true", help="ignore the resume state and send every row again")
    p.add_argument("--no-verify", action="store_true", help="skip the final count check")
    p.add_argument("--exclude-columns", default=None, help="metadata columns not to store, comma-separated")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=("table", "json"), default="table", help="report format")
    g = p.add_argument_group("server bulk import (Milvus servers only)")
    g.add_argument("--bulk-import", action="store_true",
                   help="write BulkWriter Parquet files and run import jobs instead of upserts (new collections)")
    g.add_argument("--staging-dir", default=None, help="a folder the server reads at the same path")
    g.add_argument("--s3-endpoint", default=None,
                   help=f"the server's MinIO/S3 endpoint (keys from ${S3_ACCESS_ENV} and ${S3_SECRET_ENV})")
    g.add_argument("--s3-bucket", default="a-bucket", help="the server's bucket (default a-bucket)")
    g.add_argument("--s3-path", default="deepfeat-import", help="prefix of the import files in the bucket")
    g.add_argument("--s3-secure", action="store_true", help="use https for S3")
    g.add_argument("--import-timeout", type=positive_float, default=3600.0,
                   help="seconds to wait for the import jobs")
    add_connection_args(p)
    p.set_defaults(handler=_cmd_load)


# --------------------------------------------------------------------------------------------------
# sync


def _cmd_sync(args: argparse.Namespace) -> int:
    from deepfeat.connectors.sync import reindex, sync_records
    from deepfeat.finetune.inference.runtime import resolve_num_workers

    if args.reindex_alias and args.on_error != "skip":
        raise DataError("--on-error fail is not available with --reindex-alias")
    if args.reindex_alias and args.dry_run:
        raise DataError("--dry-run is not available with --reindex-alias")
    if not args.reindex_alias and not args.collection:
        raise DataError("sync needs --collection (or --reindex-alias for a new collection behind an alias)")
    common: dict[str, Any] = {"root": args.root, "index": args.index, "key": args.key, "batch_size": args.batch_size,
                              "num_workers": resolve_num_workers(args.num_workers),
                              "progress": not args.no_progress}
    conn = connect_from_args(args)
    try:
        if args.reindex_alias:
            report = reindex(conn, args.reindex_alias, args.data, args.bundle, collection=args.collection,
                             drop_previous=args.drop_previous, **common)
        else:
            report = sync_records(conn, args.collection, args.data, args.bundle, delete_missing=not args.no_delete,
                                  dry_run=args.dry_run, on_error=args.on_error, **common)
    finally:
        conn.close()
    if args.report:
        _write_skip_report(Path(args.report), report.skipped_reasons)
    _print_report(report.to_dict(), args.format)
    return 0


def _write_skip_report(path: Path, reasons: dict[str, str]) -> None:
    """Every skipped record and why, as JSON (the layout of ``deepfeat embed``'s ``_report.json``)."""
    data = {"n_skipped": len(reasons), "skipped": [{"id": k, "reason": v} for k, v in reasons.items()]}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the skip report {str(path)!r}: {exc.strerror or exc}; the sync itself "
                        f"finished") from exc


def _add_sync(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sync",
        help="incrementally sync images into a collection (or re-index behind an alias)",
        description="Embed and upsert only new or changed images (by content hash), delete rows "
        "whose images are gone, report the counts. With --reindex-alias, fill a new "
        "collection with the bundle and switch the alias to it (zero downtime).",
    )
    p.add_argument("data", help="image folder (one sub-folder per class) or CSV/Parquet manifest")
    p.add_argument("--bundle", required=True, help="model bundle directory")
    p.add_argument("--collection", "-c", default=None,
                   help="collection (or alias) to sync; with --reindex-alias, the new collection's name "
                        "(default <alias>__<bundle id>)")
    p.add_argument("--reindex-alias", default=None, metavar="ALIAS",
                   help="fill a new collection and switch ALIAS to it when complete")
    p.add_argument("--drop-previous", action="store_true",
                   help="with --reindex-alias: drop the collection the alias pointed at before")
    p.add_argument("--root", default=None, help="folder that relative paths in a manifest are resolved against")
    p.add_argument("--index", default=None, help="index of a new collection (e.g. HNSW:M=32; default AUTOINDEX)")
    p.add_argument("--key", choices=("record_id", "content_hash"), default="record_id", help="primary key source")
    p.add_argument("--no-delete", action="store_true", help="keep rows whose images are gone")
    p.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="an unreadable image: skip and report it (default), or stop (before writing, where possible)")
    p.add_argument("--report", default=None, type=out_file, metavar="FILE",
                   help="write every skipped image and why to this JSON file")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per forward pass")
    p.add_argument("--num-workers", type=workers, default="auto",
                   help="image decoding workers, or auto: $DEEPFEAT_NUM_WORKERS, else the runtime's default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=("table", "json"), default="table", help="report format")
    add_connection_args(p)
    p.set_defaults(handler=_cmd_sync)


# --------------------------------------------------------------------------------------------------
# search


def _vector_array(value: Any, path: str) -> np.ndarray:
    """``value`` as a finite float32 (n, dim) array, or a DataError naming ``path`` and what is wrong."""
    import numpy as np

    fix = "write a list of numbers, or a list of equally long lists of numbers"
    if isinstance(value, np.ndarray) and value.dtype.kind not in "iuf":
        raise DataError(f"vector file {path!r} holds a {value.dtype} array, not numbers; {fix}")
    if _holds_bool(value):  # JSON true/false would pass as 1.0/0.0
        raise DataError(f"vector file {path!r} holds true/false values, not numbers; {fix}")
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        reason = "rows of different lengths" if "inhomogeneous" in str(exc) else "values that are not numbers"
        raise DataError(f"vector file {path!r} holds {reason}; {fix}") from exc
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"vector file {path!r} holds an array of shape {tuple(np.shape(value))}; expected "
                        f"(dim,) or (n, dim) with n, dim >= 1")
    if not np.isfinite(arr).all():
        raise DataError(f"vector file {path!r} holds NaN or infinite values; every value must be a finite number")
    return arr


def _holds_bool(value: Any) -> bool:
    if isinstance(value, list):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, bool)


def read_vector_file(path: str) -> np.ndarray:
    """Query vectors from ``.npy`` (n, dim) or (dim,), or ``.json`` (a list, or a list of lists), as float32.

    Raises:
        DataError: a missing file, another format, a file that is not a numeric array (damaged ``.npy``, object
            array, bad JSON, ragged rows, non-numbers, NaN/inf) or an empty one.
    """
    import numpy as np

    from deepfeat.finetune.data.contract import file_kind  # imports pandas: only when a command runs

    p = Path(path)
    if not p.is_file():
        kind = file_kind(p)
        what = "not found" if kind == "missing" else f"{kind}, not a regular file"
        raise DataError(f"vector file {path!r} is {what}; pass a .npy or .json file of query vectors")
    if p.suffix == ".npy":
        with p.open("rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":  # np.load would take it for a pickle and say so
            raise DataError(f"vector file {path!r} is not a .npy file (it does not start with numpy's header); "
                            f"write it with numpy.save(path, vectors.astype('float32'))")
        try:
            loaded: Any = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"vector file {path!r} is not a readable numeric .npy array ({' '.join(str(exc).split())}"
                            f"); write it with numpy.save(path, vectors.astype('float32'))") from exc
    elif p.suffix == ".json":
        try:
            loaded = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"vector file {path!r} is not JSON ({exc}); write a list of numbers or a list of "
                            f"lists") from exc
    else:
        raise DataError(f"vector file {path!r} must be .npy or .json (got {p.suffix or 'no suffix'!r})")
    return _vector_array(loaded, path)


def _load_bundle(path: str, *, quiet: bool) -> ModelBundle:
    """Load a bundle under a one-line progress display (importing torch and the model takes seconds)."""
    from tqdm.auto import tqdm

    with tqdm(total=1, desc=f"loading model bundle {path}", bar_format="{desc} ({elapsed})", disable=quiet) as bar:
        from deepfeat.finetune.models.bundle import ModelBundle

        model = ModelBundle.load(path)
        bar.update(1)
    return model


def _cmd_search(args: argparse.Namespace) -> int:
    from deepfeat.connectors.search import format_hits_table, search_ids, search_images, search_vectors

    given = [x for x in (args.image, args.id, args.vector_file) if x]
    if len(given) != 1:
        raise DataError("search needs exactly one of --image FILE..., --id ID..., --vector-file FILE")
    if args.image and not args.bundle:
        raise DataError("--image needs --bundle (the model bundle that filled the collection)")
    vectors = read_vector_file(args.vector_file) if args.vector_file else None
    kwargs: dict[str, Any] = {"top_k": args.top_k, "filter": args.filter, "group_by": args.group_by,
                              "group_size": args.group_size, "radius": args.radius, "range_filter": args.range_filter,
                              "output_fields": _csv(args.output_fields), "batch_size": args.batch_size}
    if args.search_params is not None:
        kwargs["search_params"] = args.search_params
    conn = connect_from_args(args)
    try:
        if args.image:
            labels = list(args.image)
            model = _load_bundle(args.bundle, quiet=args.quiet)
            results = search_images(conn, args.collection, args.image, model, progress=not args.quiet, **kwargs)
        elif args.id:
            labels = list(args.id)
            results = search_ids(conn, args.collection, args.id, exclude_self=not args.include_self, **kwargs)
        else:
            queries = vectors if vectors is not None else read_vector_file(args.vector_file)
            labels = [f"{Path(args.vector_file).name}[{i}]" for i in range(len(queries))]
            results = search_vectors(conn, args.collection, queries, bundle=args.bundle, **kwargs)
    finally:
        conn.close()
    if args.format == "json":
        _print_json([{"query": q, "hits": hits} for q, hits in zip(labels, results, strict=True)])
    else:
        print(format_hits_table(results, queries=labels))
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "search",
        help="search a collection by image files, record ids or vectors",
        description="Top-k search with metadata filters, group-by, range search and chosen output "
        "fields; results as a table or JSON.",
    )
    p.add_argument("--collection", "-c", required=True, help="collection or alias")
    q = p.add_argument_group("queries (exactly one)")
    q.add_argument("--image", nargs="+", default=None, metavar="FILE", help="query image file(s) (needs --bundle)")
    q.add_argument("--id", nargs="+", default=None, metavar="ID", help="record id(s) already in the collection")
    q.add_argument("--vector-file", default=None, help="query vectors: .npy (n, dim) or .json")
    p.add_argument("--bundle", default=None, help="model bundle (required with --image; checked when given)")
    p.add_argument("--top-k", "-k", type=int_at_least(1), default=10, help="hits (or groups) per query")
    p.add_argument("--filter", default=None, help='metadata filter, e.g. \'label == "shoe" and split != "train"\'')
    p.add_argument("--group-by", default=None, help="one hit per value of this field (e.g. group)")
    p.add_argument("--group-size", type=int_at_least(1), default=1, help="hits per group with --group-by")
    p.add_argument("--radius", type=float, default=None,
                   help="range search: minimum similarity (COSINE/IP) or maximum distance (L2)")
    p.add_argument("--range-filter", type=float, default=None,
                   help="range search: the other bound (maximum similarity / minimum distance)")
    p.add_argument("--output-fields", default=None,
                   help="comma-separated fields in each hit (default record_id,label,group,split,path; * for all)")
    p.add_argument("--search-params", type=json_object, default=None,
                   help="index search parameters as a JSON object, e.g. '{\"ef\": 128}'")
    p.add_argument("--include-self", action="store_true", help="with --id: keep each query record in its hits")
    p.add_argument("--batch-size", type=int_at_least(1), default=256, help="queries per request")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--quiet", action="store_true", help="no progress display while a bundle embeds --image queries")
    add_connection_args(p)
    p.set_defaults(handler=_cmd_search)


# --------------------------------------------------------------------------------------------------
# collections


def _cmd_collections(args: argparse.Namespace) -> int:
    from deepfeat.connectors.collection import describe_collection, drop_collection, list_collections
    from deepfeat.connectors.search import format_table

    if args.action != "list" and not args.name:
        raise DataError(f"'collections {args.action}' needs a collection name")
    conn = connect_from_args(args)
    try:
        if args.action == "list":
            infos = [i.to_dict() for i in list_collections(conn)]
            if args.format == "json":
                _print_json(infos)
            elif not infos:
                print(f"no collections at {conn.display_uri}")
            else:
                cols = ["name", "rows", "bundle_id", "dim", "metric", "index_type", "aliases"]
                print(format_table(cols, [[", ".join(i[c]) if c == "aliases" else i[c] for c in cols] for i in infos]))
            return 0
        if args.action == "describe":
            _print_json(describe_collection(conn, args.name))
            return 0
        if not args.yes:
            print(f"this drops collection {args.name!r} at {conn.display_uri} and all its rows; add --yes to do it",
                  file=sys.stderr)
            return 1
        drop_collection(conn, args.name)
        print(f"dropped {args.name}")
        return 0
    finally:
        conn.close()


def _add_collections(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "collections",
        help="list, describe or drop collections",
        description="List collections (rows, model bundle, dim, metric, index, aliases), describe "
        "one (stored bundle fingerprint, fields, index), or drop one.",
    )
    p.add_argument("action", choices=("list", "describe", "drop"))
    p.add_argument("name", nargs="?", default=None, help="collection (describe, drop)")
    p.add_argument("--yes", action="store_true", help="confirm drop")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format of list")
    add_connection_args(p)
    p.set_defaults(handler=_cmd_collections)


def add_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``load``, ``sync``, ``search`` and ``collections``."""
    _add_load(sub)
    _add_sync(sub)
    _add_search(sub)
    _add_collections(sub)
