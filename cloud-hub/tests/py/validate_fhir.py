#!/usr/bin/env python3
"""Validates FHIR R4 JSON resources with an independent implementation.

Reads one JSON resource per line (NDJSON) on stdin and parses each with the
`fhir.resources` 6.1.0 models (FHIR 4.0.1, pydantic 1): required elements,
cardinalities, element names (no unknown fields), choice types, primitive
formats (id, instant, dateTime, decimal, code...), and, for Bundles, every
contained resource by its own type. Prints one line per invalid resource
and `checked N resources, E errors`; exits 1 when E > 0.
"""
import json
import sys

import fhir.resources
from fhir.resources import construct_fhir_element

assert fhir.resources.__fhir_version__ == "4.0.1", fhir.resources.__fhir_version__


def validate(resource):
    """Returns a list of error strings for one resource (and its entries)."""
    errors = []
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        return ["no resourceType"]
    try:
        construct_fhir_element(rtype, resource)
    except Exception as e:  # pydantic.ValidationError, KeyError for unknown types
        errors.append(f"{rtype}/{resource.get('id', '?')}: {e}".replace("\n", " | "))
    # Validate entries by their own type too (independent of how the
    # library treats Bundle.entry.resource).
    if rtype == "Bundle":
        for i, entry in enumerate(resource.get("entry", [])):
            inner = entry.get("resource")
            if inner is not None:
                errors.extend(f"entry[{i}] {e}" for e in validate(inner))
    return errors


def main():
    checked = 0
    errors = 0
    for n, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            resource = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"line {n}: not JSON: {e}")
            errors += 1
            continue
        checked += 1
        for e in validate(resource):
            print(f"line {n}: {e}")
            errors += 1
    print(f"checked {checked} resources, {errors} errors")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
