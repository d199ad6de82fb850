"""The `ray_serve` card: where a deploy step's model serves, and the lineage behind it.

@ray_serve attaches it to its step; it reads only the step's `ray_serve` artifact (no network
calls), so it renders the same in the Metaflow UI, `python flow.py card view deploy` or offline.
"""

import html
import json

from metaflow.cards import MetaflowCard

_STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em; color: #1d2330; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { border: 1px solid #d6dae1; padding: 4px 10px; text-align: left; }
th { background: #f2f4f7; } code { font-size: 0.9em; } .chain li { margin: 2px 0; }
"""


def _cell(value):
    return "<td><code>%s</code></td>" % html.escape("" if value is None else str(value))


def _version_link(registry_uri, version):
    if not version:
        return "not recorded"
    name, number = version.rsplit("/", 1)
    text = html.escape(version)
    if registry_uri and registry_uri.startswith(("http://", "https://")):
        url = "%s/#/models/%s/versions/%s" % (registry_uri.rstrip("/"), name, number)
        return '<a href="%s">%s</a>' % (html.escape(url), text)
    return "%s <small>(%s)</small>" % (text, html.escape(registry_uri or ""))


class RayServeCard(MetaflowCard):
    type = "ray_serve"
    ALLOW_USER_COMPONENTS = False

    def __init__(self, options=None, components=None, graph=None, flow=None, **kwargs):
        self._options = options or {}

    def render(self, task):
        record = task["ray_serve"].data if "ray_serve" in task else None
        if not record:
            return "<html><body><p>This task deployed nothing.</p></body></html>"
        lineage = record.get("lineage") or {}
        rows = []
        for variant in record["variants"]:
            rows.append(
                "<tr>%s%s%s<td>%s</td>%s%s</tr>"
                % (
                    _cell(variant["name"]),
                    _cell("%g%%" % variant["weight"]),
                    _cell(variant["predictor"]),
                    _version_link(record.get("registry_uri"), variant.get("model_version")),
                    _cell(variant["model_uri"]),
                    _cell(variant["sha256"]),
                )
            )
        chain = [
            'Ray app <code>%s</code> at <a href="%s">%s</a> (cluster %s, dashboard %s)'
            % tuple(html.escape(str(record.get(k) or "")) for k in ("app", "url", "url", "address", "dashboard_url")),
        ]
        for variant in record["variants"]:
            chain.append(
                "variant <code>%s</code> &rarr; model version %s &rarr; artifact <code>%s</code>"
                % (
                    html.escape(variant["name"]),
                    _version_link(record.get("registry_uri"), variant.get("model_version")),
                    html.escape(variant["model_uri"]),
                )
            )
        for name, origin in sorted((lineage.get("model_origins") or {}).items()):
            chain.append(
                "variant <code>%s</code> trained by Metaflow task <code>%s</code>"
                % (html.escape(name), html.escape(origin.rsplit("/", 1)[0]))
            )
        if lineage.get("task"):
            chain.append("deployed by Metaflow task <code>%s</code>" % html.escape(lineage["task"]))
        for data in lineage.get("data", []):
            chain.append(
                "input data <code>%s</code> (sha256 <code>%s</code>)"
                % (html.escape(data["pathspec"]), html.escape(str(data.get("sha256"))))
            )
        if lineage.get("metrics"):
            chain.append("metrics <code>%s</code>" % html.escape(json.dumps(lineage["metrics"], sort_keys=True)))
        return (
            "<html><head><meta charset='utf-8'><style>%s</style></head><body>"
            "<h1>Serving <code>%s</code> at <a href='%s'>%s</a></h1>"
            "<h2>Variants</h2><table><tr><th>variant</th><th>traffic</th><th>predictor</th>"
            "<th>model version</th><th>model</th><th>sha256</th></tr>%s</table>"
            "<h2>Lineage</h2><ol class='chain'>%s</ol>"
            "<p><small>Check every hop: <code>ray-deploy lineage %s</code></small></p></body></html>"
            % (
                _STYLE,
                html.escape(record["app"]),
                html.escape(record["url"]),
                html.escape(record["url"]),
                "".join(rows),
                "".join("<li>%s</li>" % item for item in chain),
                html.escape(record["app"]),
            )
        )


CARDS = [RayServeCard]
