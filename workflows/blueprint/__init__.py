"""Blueprints: processes defined as published data (../shared/DESIGN.md section 4).

`model` holds the language (`dsl: 1`) as frozen pydantic models, `catalog` the activities a
blueprint may call, `check` the publish-time checker (`parse_blueprint` is the way in).
"""
