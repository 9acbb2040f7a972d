"""The processings this warehouse offers, defined as the platform's (seeds 001 to 003), and the
validation of an execution's parameters against a definition: every problem is listed at once.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import RASTER, STANDARD, VECTOR

PYRAMID = "ROK4-PYRAMID-RASTER"
VECTOR_DB = "VECTOR-DB"
PYRAMID_VECTOR = "ROK4-PYRAMID-VECTOR"
VECTOR_TO_PYRAMID = "Calcul ou mise à jour de pyramide vecteur"
VECTOR_TO_BASE = "Intégration de données vecteur livrées en base"
RASTER_TO_PYRAMID = "Calcul de pyramide raster"
RASTER_TO_PYRAMID_OR_UPDATE = "Calcul ou mise à jour de pyramide raster"
WMS_TO_PYRAMID = "Calcul ou mise à jour de pyramide raster par moissonnage WMS"
_NAMESPACE = uuid.UUID("6a1f0e37-8c2d-4b5e-a9f1-3d4c5b6a7e80")
_TEXT = {"type": "string"}


def _p(name: str, description: str, mandatory: bool = False, constraints: dict | None = None,
       default: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "description": description, "mandatory": mandatory}
    if constraints is not None:
        out["constraints"] = constraints
    if default is not None:
        out["default_value"] = default
    return out


def _raster_parameters(tms: list[str]) -> list[dict[str, Any]]:
    """Seed 002's parameters, in its order; `tms` lists the grids this server has (PM first)."""
    return [
        _p("bottom", "Niveau du bas de la pyramide. Attention à ne pas sur-échantillonner les données utilisées. "
           "En ne précisant pas de niveau, le traitement prendra le niveau de la grille dont la résolution est la "
           "plus proche des images livrées"),
        _p("tms", "Tile Matrix Set, grille de définition des tuiles. Dans le cas d'une génération initiale, il est "
           "obligatoire", constraints={"type": "string", "enum": tms}),
        _p("width", "Nombre de tuiles dans une dalle, dans le sens de la largeur", default=16),
        _p("compression", "Compression des données dans les tuiles",
           constraints={"type": "string", "enum": ["jpg", "png"]}),
        _p("interpolation", "Interpolation", constraints={"type": "string", "enum": ["nn", "linear", "bicubic"]}),
        _p("parallelization", "Nombre de scripts d'écriture des dalles en parallèle", default=1),
        _p("top", "Niveau du haut de la pyramide. Par défaut, on remonte jusqu'au niveau le plus haut de la grille"),
        _p("mask", "Écriture des masques de données dans la pyramide en sortie", default="false"),
        _p("height", "Nombre de tuiles dans une dalle, dans le sens de la hauteur", default=16),
    ]


def _harvest_parameters(tms: list[str]) -> list[dict[str, Any]]:
    """Seed 001's parameters, in its order."""
    return [
        _p("harvest_layers", "Couches à moisonner (séparées par des virgules)", True, _TEXT),
        _p("top", "Le niveau du haut de la pyramide en sortie ", constraints=_TEXT),
        _p("harvest_dimensions", "Deux entiers positifs, dimensions pixel maximales de moisonnage, devra être un "
           "diviseur de la taille pixel des dalles",
           constraints={"type": "array", "items": {"type": "integer"}, "maxItems": 2, "minItems": 2}),
        _p("compression", "La compression des données en sortie (valeurs possibles: raw, jpg, png, zip, jpg90)",
           constraints={"enum": ["raw", "jpg", "png", "zip", "jpg90"], "type": "string"}),
        _p("samplesperpixel", "Nombre de canaux dans les dalles en sortie (entier de 1 à 4)",
           constraints={"type": "integer", "maximum": 4, "minimum": 1}),
        _p("parallelization", "Le niveau de parallélisation du calcul (défaut à 1, entier >= 1)", default=1),
        _p("tms", "L identifiant du quadrillage à utiliser (Tile Matrix Set)",
           constraints={"enum": tms, "type": "string"}),
        _p("height", "Le nombre de tuile par dalle en hauteur (entier >= 1)", default=16),
        _p("harvest_levels", "Identifiants des niveaux pour lesquels on moissonne les dalles (celui le plus bas sera "
           "le niveau du bas de la pyramide). On considère que les niveaux sont précisés de bas en haut.", True,
           {"type": "array", "items": {"type": "string"}}),
        _p("sampleformat", "Format des canaux dans les dalles en sortie (UINT8 ou FLOAT32)",
           constraints={"enum": ["UINT8", "FLOAT32"], "type": "string"}),
        _p("harvest_threshold", "Taille minimale en octet des dalles moissonnées",
           constraints={"type": "integer", "minimum": 0}),
        _p("harvest_extras", "Paramètres de requêtes GetMap additionnels, hors layers, bbox, format et srs",
           constraints=_TEXT),
        _p("width", "Le nombre de tuile par dalle en largeur (entier >= 1)", default=16),
        _p("harvest_area", "WKT de la zone sur laquelle le moissonnage doit se faire, en EPSG:4326", True, _TEXT),
        _p("harvest_format", "Format des images téléchargées", True, {"enum": [
            "image/png", "image/tiff", "image/jpeg", "image/x-bil;bits=32",
            "image/tiff&format_options=compression:deflate", "image/tiff&format_options=compression:lzw",
            "image/tiff&format_options=compression:packbits", "image/tiff&format_options=compression:raw"],
            "type": "string"}),
        _p("harvest_url", "URL du service WMS, avec le protocole et le chemin", True, _TEXT),
        _p("bottom", "Le niveau du bas de la pyramide en sortie ", True, _TEXT),
        _p("nodata", "Valeur de nodata pour compléter les images",
           constraints={"type": "array", "items": {"type": "integer"}, "minItems": 1}),
    ]


def _vector_parameters() -> list[dict[str, Any]]:
    """Seed 003's parameters."""
    return [
        _p("srs", "Projection des données en base (par défaut celle de la livraison) ; seulement pour une nouvelle "
           "base", constraints=_TEXT),
        _p("update", "Mise à jour d'une base existante (output.stored_data.id) : les tables livrées qui y existent "
           "déjà sont mises à jour par leur clé fid", constraints={"type": "boolean"}),
        _p("delete", "Suppression dans une base existante (output.stored_data.id) : les objets des tables livrées "
           "qui y existent déjà sont supprimés par leur clé fid", constraints={"type": "boolean"}),
    ]


def _vector_pyramid_parameters(grids: list[str]) -> list[dict[str, Any]]:
    """The platform's parameters of the vector pyramid processing (levels travel as strings);
    `grids`: the Web Mercator quadtree grids this server has (tippecanoe cuts no other)."""
    item = {"type": "object", "required": ["table"], "properties": {
        "table": _TEXT, "layer": _TEXT, "filter": _TEXT, "attributes": {"type": "array", "items": _TEXT},
        "top_level": _TEXT, "bottom_level": _TEXT}}
    return [
        _p("composition", "Tables de la base à mettre dans la pyramide : table, nom de la couche dans les tuiles "
           "(layer, par défaut la table), filtre (condition WHERE), attributs ([\"*\"] pour tous), niveaux du haut "
           "et du bas", constraints={"type": "array", "items": item, "minItems": 1}),
        _p("bottom_level", "Niveau du bas de la pyramide (obligatoire sans composition)"),
        _p("top_level", "Niveau du haut de la pyramide (obligatoire sans composition)"),
        _p("tippecanoe_options", "Options de généralisation de tippecanoe (par exemple -S10 ou -ac -an -S10)",
           constraints=_TEXT),
        _p("area", "WKT en EPSG:4326 de la zone à calculer (échantillon) ; pour une mise à jour, la zone à "
           "recalculer (arrondie aux tuiles du niveau du haut de la composition), le reste étant repris de la "
           "pyramide mise à jour", constraints=_TEXT),
        _p("tms", "Tile Matrix Set, grille des tuiles : pseudo-Mercator seulement (tippecanoe ne découpe que "
           "celle-ci) ; pour une mise à jour, celle de la pyramide mise à jour",
           constraints={"type": "string", "enum": grids}),
        _p("width", "Nombre de tuiles dans une dalle, dans le sens de la largeur (16 par défaut ; mise à jour : celui de la "
           "pyramide mise à jour)"),
        _p("height", "Nombre de tuiles dans une dalle, dans le sens de la hauteur (16 par défaut ; mise à jour : celui de la "
           "pyramide mise à jour)"),
        _p("parallelization", "Nombre de fils de calcul des tuiles (tippecanoe) et de processus d'écriture des "
           "dalles", default=1),
    ]


@dataclass(frozen=True)
class Processing:
    key: str  # what the runner does: "build" (with update by reference), "harvest", "vector" or "vector-pyramid"
    name: str
    description: str
    upload_types: tuple[str, ...]
    stored_data_types: tuple[str, ...]
    parameters: tuple[dict[str, Any], ...]
    required_checks: tuple[str, ...]  # check keys
    output: str = PYRAMID
    storage: str = "FILESYSTEM"

    @property
    def id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, self.name))

    @property
    def needs_upload(self) -> bool:
        return bool(self.upload_types)

    def view(self) -> dict[str, Any]:
        checks = {c.key: c for c in (RASTER, STANDARD, VECTOR)}
        return {
            "_id": self.id,
            "name": self.name,
            "description": self.description,
            "input_types": {"upload": list(self.upload_types), "stored_data": list(self.stored_data_types)},
            "output_type": {"stored_data": self.output, "storage": [self.storage]},
            "parameters": [dict(p) for p in self.parameters],
            "required_checks": [checks[k].view() for k in self.required_checks],
        }

    def summary_view(self) -> dict[str, Any]:
        return {"_id": self.id, "name": self.name}


@functools.cache
def processings(tms_directory: str) -> tuple[Processing, ...]:
    from tileserver.writer.vector_pyramid import vector_grids

    grids = sorted(p.stem for p in Path(tms_directory).glob("*.json")) if Path(tms_directory).is_dir() else []
    tms = ["PM"] + [g for g in grids if g != "PM"]
    raster = tuple(_raster_parameters(tms))
    return (
        Processing("build", RASTER_TO_PYRAMID,
                   "Génération ou mise à jour d'une pyramide de tuiles raster à partir d'une livraison d'images "
                   "géo-référencées", ("RASTER",), (PYRAMID,), raster, ("raster", "standard")),
        Processing("build", RASTER_TO_PYRAMID_OR_UPDATE,
                   "Génération d'une pyramide de tuiles raster à partir d'une livraison d'images géo-référencées, "
                   "ou mise à jour par référence d'une pyramide fournie en entrée avec de nouvelles images",
                   ("RASTER",), (PYRAMID,), raster, ("raster", "standard")),
        Processing("harvest", WMS_TO_PYRAMID,
                   "Il n'y a pas besoin de donnée en entrée. Sont fournis en paramètres toutes les informations sur "
                   "le service WMS et le jeu de données à moissonner, ainsi que la zone sur laquelle faire le "
                   "moissonnage", (), (PYRAMID,), tuple(_harvest_parameters(tms)), ()),
        # the platform names the storage POSTGRESQL; here a base is one GeoPackage file
        Processing("vector", VECTOR_TO_BASE,
                   "Intégration en base de données vecteur livrées (GeoPackage, Shapefile, GeoJSON, CSV), ou mise à "
                   "jour d'une base existante (output.stored_data.id) avec des fichiers .update et .delete",
                   ("VECTOR",), (), tuple(_vector_parameters()), ("vector", "standard"), VECTOR_DB, "POSTGRESQL"),
        Processing("vector-pyramid", VECTOR_TO_PYRAMID,
                   "Calcul d'une pyramide de tuiles vectorielles (ROK4, tuiles Mapbox Vector Tiles) à partir d'une "
                   "base de données vecteur, par tippecanoe ; ou mise à jour d'une pyramide vecteur fournie en entrée "
                   "avec la base : les couches composées y sont recalculées aux niveaux composés (dans la zone "
                   "`area`), les autres dalles sont référencées", (), (VECTOR_DB, PYRAMID_VECTOR),
                   tuple(_vector_pyramid_parameters(vector_grids(tms_directory) or ["PM"])), (), PYRAMID_VECTOR, "S3"),
    )


def find(tms_directory: str, ident: str) -> Processing | None:
    return next((p for p in processings(tms_directory) if p.id == ident.lower()), None)


# --- parameter validation -------------------------------------------------------------------------

_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "array": list, "number": (int, float), "boolean": bool,
                                              "object": dict}
_POSITIVE = ("width", "height", "parallelization")


def _type_ok(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    expected = _TYPES.get(kind)
    return expected is None or isinstance(value, expected)


def _constraint_problems(name: str, value: Any, constraints: dict[str, Any]) -> list[str]:
    where = f"parameters.{name}"
    kind = constraints.get("type")
    if kind is not None and not _type_ok(value, kind):
        return [f"{where}: must be of type {kind} (got {value!r})"]
    problems = []
    if "enum" in constraints and value not in constraints["enum"]:
        problems.append(f"{where}: must be one of {', '.join(map(str, constraints['enum']))} (got {value!r})")
    if "minimum" in constraints and isinstance(value, int | float) and value < constraints["minimum"]:
        problems.append(f"{where}: must be at least {constraints['minimum']} (got {value})")
    if "maximum" in constraints and isinstance(value, int | float) and value > constraints["maximum"]:
        problems.append(f"{where}: must be at most {constraints['maximum']} (got {value})")
    if isinstance(value, list):
        if "minItems" in constraints and len(value) < constraints["minItems"]:
            problems.append(f"{where}: must have at least {constraints['minItems']} items")
        if "maxItems" in constraints and len(value) > constraints["maxItems"]:
            problems.append(f"{where}: must have at most {constraints['maxItems']} items")
        items = constraints.get("items", {})
        for i, item in enumerate(value):
            if "type" in items and not _type_ok(item, items["type"]):
                problems.append(f"{where}[{i}]: must be of type {items['type']} (got {item!r})")
    return problems


def _free_problems(name: str, value: Any) -> list[str]:
    """Checks of the parameters the definitions leave unconstrained."""
    where = f"parameters.{name}"
    if name in _POSITIVE:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
            return [f"{where}: must be a positive integer (got {value!r})"]
        if int(value) < 1:
            return [f"{where}: must be at least 1 (got {value})"]
    elif name == "mask":
        if value not in (True, False, "true", "false"):
            return [f"{where}: must be true or false (got {value!r})"]
    elif name in ("bottom", "top", "bottom_level", "top_level"):
        if isinstance(value, bool) or not isinstance(value, str | int):
            return [f"{where}: must be a level identifier (got {value!r})"]
    return []


def check_parameters(processing: Processing, given: Any) -> tuple[dict[str, Any], list[str]]:
    """(parameters with defaults filled, problems). Level ids are checked later, against the grid."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return {}, ["parameters: must be an object"]
    definitions = {p["name"]: p for p in processing.parameters}
    problems = [f"parameters.{name}: unknown parameter of processing '{processing.name}'"
                for name in given if name not in definitions]
    for name, definition in definitions.items():
        if name not in given:
            if definition["mandatory"]:
                problems.append(f"parameters.{name}: mandatory parameter missing")
            continue
        value = given[name]
        if "constraints" in definition:
            problems += _constraint_problems(name, value, definition["constraints"])
        else:
            problems += _free_problems(name, value)
    out = dict(given)
    for name, definition in definitions.items():
        if name not in out and "default_value" in definition:
            out[name] = definition["default_value"]
    return out, problems


def flag(value: Any) -> bool:
    return value is True or value == "true"
