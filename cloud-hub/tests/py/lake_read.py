"""The lake tests' independent reader: pyarrow reads every Parquet file of a
lake and prints one JSON document; azure-storage-blob talks to Azurite.

  lake_read.py create-container CONNECTION_STRING CONTAINER
  lake_read.py sas ACCOUNT KEY CONTAINER   (a 2-hour container SAS: read, add, create, write, delete, list)
  lake_read.py download CONNECTION_STRING CONTAINER DEST   (every blob → DEST/<name>)
  lake_read.py read DIR

`read` prints {"files": [{"path", "rows", "layer", "schema_version",
"columns": {name: [cell, ...]}}]} with timestamps as integer microseconds
since the epoch (UTC) and every other cell as JSON (null, number, bool,
string).
"""

import json
import os
import sys


def create_container(conn, container):
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(conn)
    svc.create_container(container)


def sas(account, key, container):
    import datetime

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    token = generate_container_sas(
        account_name=account,
        container_name=container,
        account_key=key,
        permission=ContainerSasPermissions(
            read=True, add=True, create=True, write=True, delete=True, list=True
        ),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2),
    )
    print(token)


def download(conn, container, dest):
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(conn)
    c = svc.get_container_client(container)
    n = 0
    for blob in c.list_blobs():
        path = os.path.join(dest, blob.name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(c.download_blob(blob.name).readall())
        n += 1
    print(n)


def cell(v):
    import datetime

    if isinstance(v, datetime.datetime):
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        d = v - epoch
        return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds
    return v


def read(root):
    import pyarrow.parquet as pq

    files = []
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            if not name.endswith(".parquet"):
                continue
            path = os.path.join(dirpath, name)
            pf = pq.ParquetFile(path)
            meta = {
                k.decode(): v.decode()
                for k, v in (pf.metadata.metadata or {}).items()
                if k.startswith(b"vigil.")
            }
            # Read without hive partitioning: the columns are the file's own.
            table = pf.read()
            files.append(
                {
                    "path": os.path.relpath(path, root),
                    "rows": table.num_rows,
                    "layer": meta.get("vigil.lake.layer"),
                    "schema_version": meta.get("vigil.lake.schema_version"),
                    "columns": {
                        n: [cell(v) for v in table.column(n).to_pylist()]
                        for n in table.column_names
                    },
                }
            )
    files.sort(key=lambda f: f["path"])
    json.dump({"files": files}, sys.stdout)


def summary(root):
    """Silver per (pseudonym, loinc): rows and the sum of values; and every
    distinct text value of the silver and gold files (for an identifier
    scan without dumping a million rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups = {}
    texts = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".parquet"):
                continue
            pf = pq.ParquetFile(os.path.join(dirpath, name))
            meta = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()}
            layer = meta.get("vigil.lake.layer", "")
            if not (layer == "silver" or layer.startswith("gold")):
                continue
            table = pf.read()
            for col, field in zip(table.columns, table.schema):
                if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
                    texts.update(v for v in col.to_pylist() if v is not None)
            if layer != "silver":
                continue
            for p, l, v in zip(
                table.column("pseudonym").to_pylist(),
                table.column("loinc").to_pylist(),
                table.column("value").to_pylist(),
            ):
                g = groups.setdefault(p + "|" + l, [0, 0.0])
                g[0] += 1
                g[1] += v or 0.0
    json.dump({"groups": groups, "texts": sorted(texts)}, sys.stdout)


def main():
    cmd = sys.argv[1]
    if cmd == "create-container":
        create_container(sys.argv[2], sys.argv[3])
    elif cmd == "sas":
        sas(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "download":
        download(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "read":
        read(sys.argv[2])
    elif cmd == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
