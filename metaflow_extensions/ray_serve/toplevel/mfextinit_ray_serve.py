# The module Metaflow loads as this extension's top level (it names us in `metaflow` version strings).
toplevel = "ray_serve_toplevel"
