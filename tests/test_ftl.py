"""FreeMarker subset of GeoServer's GetFeatureInfo templates: output, escaping, refusals, attributes used."""

from __future__ import annotations

import pytest
import shapely

from tileserver.render.ftl import ftl_attributes, render_ftl

FEATURES = [
    {"id": 12, "properties": {"nom": "Paris <1er>", "insee_dep": "75", "population": 16000, "surface": None},
     "geometry": shapely.Point(2.35, 48.85)},
    {"id": 13, "properties": {"nom": "Lyon & co", "insee_dep": "69", "population": 500000, "surface": 47.87},
     "geometry": None},
]

# GeoServer's own default content.ftl
GEOSERVER_CONTENT = """<#list features as feature>
<h3>${type.name}: ${feature.fid}</h3><ul>
<#list feature.attributes as attribute>
  <#if !attribute.isGeometry>
  <li>${attribute.name} = ${attribute.value}</li>
  </#if>
</#list></ul>
</#list>"""


def test_geoservers_default_template() -> None:
    out = render_ftl(GEOSERVER_CONTENT, FEATURES, "canton")
    assert "<h3>canton: canton.12</h3>" in out and "<h3>canton: canton.13</h3>" in out
    assert "<li>nom = Paris &lt;1er&gt;</li>" in out  # values are escaped
    assert "<li>surface = </li>" in out  # null: "" as GeoServer
    assert "<li>population = 500000</li>" in out and "<li>surface = 47.87</li>" in out
    assert "POINT" not in out and "geometry" not in out


def test_attribute_by_name_defaults_and_builtins() -> None:
    template = ('<#list features as f>[${f.nom.value?upper_case}|${f.surface.rawValue!"n/a"}|${f["insee_dep"].value}'
                '|${f.missing!}|${(f.missing.value)!"-"}|${f.nom.value?html}|${f.nom.value?length}'
                '|${f.population.value?string}|${f.nom?has_content?string("y", "n")}]</#list>')
    out = render_ftl(template, FEATURES, "canton")
    assert out == ("[PARIS &lt;1ER&gt;|n/a|75||-|Paris &lt;1er&gt;|11|16000|y]"
                   "[LYON &amp; CO|47.87|69||-|Lyon &amp; co|9|500000|y]")


def test_if_elseif_else_and_comparisons() -> None:
    template = ('<#-- a comment ${not.evaluated} --><#list features as feature>'
                '<#if feature.population.value?number gt 100000>big'
                '<#elseif feature.insee_dep.value == "75" && feature.surface.rawValue??>paris with surface'
                '<#elseif (feature.population.rawValue >= 16000) || false>paris<#else>other</#if>;</#list>')
    with pytest.raises(ValueError, match=r"\?number"):
        render_ftl(template, FEATURES)
    template = template.replace("feature.population.value?number gt 100000", "feature.population.rawValue gt 100000")
    assert render_ftl(template, FEATURES) == "paris;big;"


def test_loop_variables_sep_else_and_assign() -> None:
    template = ('<#assign n = features?size><#list features as f>${f?counter}/${n}:${f.nom.value}'
                '<#if f?has_next>, </#if></#list>|<#list features as f>${f_index}<#sep>-</#list>'
                '|<#list [] as x>never</#list>')
    with pytest.raises(ValueError):  # sequence literals are not in the subset
        render_ftl(template, FEATURES)
    template = template.split("|<#list []")[0] + "|<#list features[0].attributes as a><#if a.name == 'x'>"\
        "no</#if><#else>empty</#list>"
    out = render_ftl(template, FEATURES)
    assert out == "1/2:Paris &lt;1er&gt;, 2/2:Lyon &amp; co|0-1|"
    assert render_ftl("<#list features as f>${f.nom}<#else>nothing here</#list>", []) == "nothing here"


def test_flat_dicts_and_no_esc() -> None:
    out = render_ftl("<#list features as f>${f.fid} ${f.a.value} ${f.b.value?no_esc} ${f.typeName}</#list>",
                     [{"fid": 7, "a": "x<y", "b": "<b>bold</b>"}], "t")
    assert out == "t.7 x&lt;y <b>bold</b> t"


@pytest.mark.parametrize(("template", "message"), [
    ("<#include 'x.ftl'>", "#include"),
    ("<#macro m></#macro>", "#macro"),
    ("<@m/>", "macros"),
    ("${x?eval}", r"\?eval"),
    ("<#if true>", "not closed"),
    ("</#if>", "closes nothing"),
    ("${features[0].nom.value", "not closed"),
    ("<#list features>x</#list>", "as name"),
    ("${undefined_thing}", "undefined"),
    ("<#if 'text'>x</#if>", "true/false"),
    ("[#if true]x[/#if]", "square bracket"),
])
def test_unsupported_or_wrong_is_refused_with_a_reason(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_ftl(template, FEATURES)


def test_attributes_a_template_uses() -> None:
    template = ('<#list features as feature>${feature.nom.value} ${feature["insee_dep"].value!} ${feature.fid}'
                '<#if feature.population.rawValue gt 3>x</#if><#list feature.attributes as attribute>'
                '${attribute.name}</#list></#list><#list features as g>${g.surface.value}</#list>'
                '${features[0].code.value!} ${type.name}')
    assert ftl_attributes(template) == {"nom", "insee_dep", "population", "surface", "code"}
    assert ftl_attributes(GEOSERVER_CONTENT) == set()
    with pytest.raises(ValueError, match="#macro"):
        ftl_attributes("<#macro m></#macro>")
