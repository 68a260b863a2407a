"""A Label Studio labeling config, read for what the teachers can fill in.

The config is Label Studio's XML (``<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="cat"/>...``). Only the controls that
take image regions matter here: ``RectangleLabels`` (boxes), ``BrushLabels`` (masks),
``PolygonLabels`` (masks traced as polygons) and ``KeyPointLabels`` (clicks of the smart tools,
never predicted). A ``Label`` may list extra model names in ``predicted_values="a,b"``
(Label Studio's attribute for that) or ``alias``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from teacher.coco.io import clean_name
from teacher.core.errors import TeacherError

REGION_CONTROLS = {  # XML tag -> result type (the key of the label list in a result's value)
    "rectanglelabels": "rectanglelabels",
    "brushlabels": "brushlabels",
    "polygonlabels": "polygonlabels",
    "keypointlabels": "keypointlabels",
}
PREDICTED = ("rectanglelabels", "brushlabels", "polygonlabels")  # what pre-labeling fills
# Classes a labeling config may prompt with (`teacher serve` without --classes): about 60 short
# names fill one 256-token prompt, and every prompt is one more DINO forward per image.
MAX_CONFIG_CLASSES = 512


class LabelConfigError(TeacherError):
    """The labeling config cannot be used (bad XML, no image, controls naming unknown images)."""


@dataclass(frozen=True)
class Control:
    """One region control of the config: where its results go and which labels it offers."""

    name: str  # from_name of its results
    type: str  # result type: rectanglelabels | brushlabels | polygonlabels | keypointlabels
    to_name: str  # the Image tag's name
    value: str  # the task data key holding that image's URL ("image" for value="$image")
    labels: tuple[str, ...]  # the Label values, in config order
    aliases: dict[str, str] = field(default_factory=dict)  # lower-cased model name -> label


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[Control, ...]

    def of_type(self, *types: str) -> list[Control]:
        return [c for c in self.controls if c.type in types]


def key(name: str) -> str:
    """Names compared as a person would: case, surrounding spaces, ``_``/``-`` vs space."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _label_aliases(label: ET.Element) -> list[str]:
    extra = label.get("predicted_values", "") + "," + label.get("alias", "")
    return [label.get("value", "")] + [a for a in extra.split(",") if a.strip()]


def parse_label_config(xml: str) -> LabelConfig:
    """The region controls of a labeling config; ``LabelConfigError`` saying what is wrong."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label_config is empty: send the project's labeling config XML")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise LabelConfigError(f"label_config is not valid XML ({e})") from e
    images = {
        el.get("name", ""): el.get("value", "")
        for el in root.iter()
        if el.tag.lower() == "image" and el.get("name")
    }
    controls = []
    for el in root.iter():
        kind = REGION_CONTROLS.get(el.tag.lower())
        if kind is None:
            continue
        name, to_name = el.get("name"), el.get("toName") or el.get("toname")
        if not name or to_name is None or to_name not in images:
            raise LabelConfigError(
                f"<{el.tag} name={name!r} toName={to_name!r}>: toName must name an <Image> of the "
                f"config (images: {sorted(images)})"
            )
        labels = [lab for lab in el.iter() if lab.tag.lower() == "label" and lab.get("value")]
        aliases = {key(a): lab.get("value", "") for lab in labels for a in _label_aliases(lab)}
        controls.append(
            Control(
                name=name,
                type=kind,
                to_name=to_name,
                value=images[to_name].lstrip("$"),
                labels=tuple(lab.get("value", "") for lab in labels),
                aliases=aliases,
            )
        )
    return LabelConfig(controls=tuple(controls))


def config_classes(config: LabelConfig) -> list[str]:
    """The labels of the controls pre-labeling fills (RectangleLabels, BrushLabels,
    PolygonLabels), in config order, each once (as :func:`key` compares them): the classes to
    prompt with when the server has none of its own. ``LabelConfigError`` when there is none
    or more than ``MAX_CONFIG_CLASSES``."""
    controls = config.of_type(*PREDICTED)
    if not controls:
        raise LabelConfigError(
            "the labeling config has no RectangleLabels, BrushLabels or PolygonLabels on an "
            "<Image>: nothing to predict"
        )
    labels: dict[str, str] = {}  # the prompt text, compared as key() does -> the label
    for control in controls:
        for label in control.labels:
            if not clean_name(label):
                raise LabelConfigError(
                    f"<Label value={label!r}> of {control.name!r} has no words once '.' and '?' "
                    "(prompt delimiters) are removed: rename it to prompt the teachers with it"
                )
            labels.setdefault(key(clean_name(label)), label)
    if not labels:
        raise LabelConfigError(
            "the labeling config's RectangleLabels, BrushLabels and PolygonLabels have no "
            '<Label value="..."/>: the server was started without --classes and prompts with '
            "the config's labels; add a Label per class"
        )
    if len(labels) > MAX_CONFIG_CLASSES:
        raise LabelConfigError(
            f"the labeling config has {len(labels)} labels; at most {MAX_CONFIG_CLASSES} "
            "prompt the teachers (each ~60 is one more forward per image): start "
            "`teacher serve --classes` with the ones to pre-label"
        )
    return list(labels.values())


def match_labels(class_names: list[str], control: Control) -> tuple[dict[str, str], list[str]]:
    """Model class name -> the control's label; and the class names it has no label for.

    A class matches a label of the same name (case, spaces, ``_``/``-`` ignored) or one listing
    it in ``predicted_values`` / ``alias``.
    """
    mapping, unknown = {}, []
    for name in class_names:
        label = control.aliases.get(key(name))
        if label is None:
            unknown.append(name)
        else:
            mapping[name] = label
    return mapping, unknown
