"""Validation rules for a COCO dataset: named checks with a severity, and the fixes they apply.

``validator.validate_coco(data, ...)`` never touches its input: it works on a copy and returns
the validated copy with its findings. Severities:

- ``error``: the record cannot be used (duplicate id, unknown image, missing file...). With
  ``on_error="drop"`` the offending record is removed (and an image's annotations with it);
  with ``"fail"`` the caller stops. Either way every error is reported.
- ``fix``: the record was repaired in the copy (bbox from mask, clipped bbox, size from file...).
- ``warning``: usable but worth a look (unused category, negative image, tiny box...).

A finding is one rule with every id it concerns: ``{"rule", "severity", "record", "count",
"ids", "message", "fix", "details"}``. Category ids are kept as they are (no remapping).

Modules: ``registry`` (the rule table), ``findings`` (what the checks found), the checks by
theme (``ids``, ``categories``, ``images``, ``references``, ``annotations`` with its pure
``geometry``, ``coverage``), ``validator`` (every check in order, from a file) and ``report``
(``metrics/validate.json`` and the summary text).
"""
