"""JSON schemas for structured-output tests and benchmarks, simplest first, each with one valid instance.

Every schema bounds its output so that even a 135M model finishes it in ~300 tokens: strings carry a
maxLength (<= 40) or are an enum, const or pattern of bounded repetition, arrays a maxItems (<= 5), numbers a
minimum and maximum, and objects `additionalProperties: false`. No `format` keywords.
EXAMPLES lists properties in the schema's declared order, as xgrammar (strict, in-order) and llguidance both
generate them; json.dumps(instance) with its default separators (", ", ": ") is the compact form both accept.
Keywords xgrammar 0.2.9 refused: none (uniqueItems, contains, not, if/then, dependentRequired are left out
because llguidance 1.9.1 rejects them; xgrammar ignores minLength/maxLength next to a pattern, so no schema
combines them).
"""

from __future__ import annotations


def s(max_len: int, min_len: int = 0) -> dict:
    return {"type": "string", "minLength": min_len, "maxLength": max_len}


def i(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def num(lo: float, hi: float) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi}


def pat(regex: str) -> dict:
    return {"type": "string", "pattern": regex}


def arr(items: dict, max_items: int, min_items: int = 0) -> dict:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


def obj(props: dict, optional: tuple[str, ...] = ()) -> dict:
    """A closed object whose properties are all required except `optional`."""
    return {
        "type": "object",
        "properties": props,
        "required": [k for k in props if k not in optional],
        "additionalProperties": False,
    }


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


BOOL = {"type": "boolean"}
NULL = {"type": "null"}
EMAIL = pat(r"^[a-z]{1,12}@[a-z]{1,10}\.(com|org|net)$")
TIME = pat(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
DATE = pat(r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")
MONEY = obj({"amount": num(0, 100000), "currency": {"enum": ["EUR", "USD", "GBP", "JPY"]}})
ADDRESS = obj(
    {"street": s(40), "city": s(30), "zip": pat(r"^[0-9]{5}$"), "country": {"enum": ["FR", "DE", "US", "JP"]}}
)
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
COUNTRIES = [
    "AR",
    "AU",
    "BR",
    "CA",
    "CH",
    "CN",
    "DE",
    "ES",
    "FR",
    "GB",
    "IN",
    "IT",
    "JP",
    "KR",
    "MX",
    "NL",
    "NO",
    "PL",
    "SE",
    "US",
]

SCHEMAS: list[tuple[str, dict]] = [
    # -- flat objects ----------------------------------------------------------------------------
    ("flat_name", obj({"name": s(30)})),
    ("flat_person", obj({"name": s(30), "age": i(0, 130), "active": BOOL})),
    ("flat_mixed", obj({"title": s(40), "count": i(0, 1000), "ratio": num(0, 1), "done": BOOL})),
    ("flat_booleans", obj({"read": BOOL, "write": BOOL, "execute": BOOL})),
    ("flat_date_parts", obj({"year": i(1900, 2100), "month": i(1, 12), "day": i(1, 31)})),
    ("string_lengths", obj({"code": s(4, 2), "note": s(20), "label": s(8, 8)})),
    ("negative_numbers", obj({"celsius": num(-50, 60), "offset": i(-12, 14), "depth": i(-11000, 0)})),
    # -- enums and consts ------------------------------------------------------------------------
    ("enum_color", obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("enum_mixed_types", obj({"level": {"enum": ["low", 1, True, None]}})),
    ("const_fields", obj({"version": {"const": "v1"}, "kind": {"const": 3}, "name": s(20)})),
    ("enum_country", obj({"country": {"enum": COUNTRIES}, "city": s(30)})),
    # -- string patterns -------------------------------------------------------------------------
    ("pattern_ticket", obj({"ticket": pat(r"^[A-Z]{3}-[0-9]{2,4}$")})),
    ("pattern_date", obj({"date": DATE})),
    ("pattern_hex_color", obj({"fg": pat(r"^#[0-9a-f]{6}$"), "bg": pat(r"^#[0-9a-f]{6}$")})),
    ("pattern_semver", obj({"package": s(30), "version": pat(r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")})),
    ("pattern_email", obj({"email": EMAIL})),
    ("pattern_alternation", obj({"method": pat(r"^(GET|POST|PUT|DELETE)$"), "path": pat(r"^(/[a-z]{1,8}){1,4}$")})),
    # -- numeric bounds --------------------------------------------------------------------------
    ("number_bounds", obj({"temperature": num(-50, 60), "humidity": num(0, 100)})),
    (
        "exclusive_bounds",
        obj(
            {
                "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
                "rank": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
            }
        ),
    ),
    ("multiple_of", obj({"minutes": {"type": "integer", "multipleOf": 15, "minimum": 0, "maximum": 120}})),
    # -- optional and nullable -------------------------------------------------------------------
    ("optional_props", obj({"name": s(30), "nickname": s(15), "age": i(0, 130)}, optional=("nickname", "age"))),
    ("all_optional", obj({"a": BOOL, "b": i(0, 9), "c": s(10)}, optional=("a", "b", "c"))),
    ("nullable_type_list", obj({"first": s(20), "middle": {"type": ["string", "null"], "maxLength": 20}})),
    ("anyof_null", obj({"score": {"anyOf": [i(0, 100), NULL]}})),
    ("anyof_scalars", obj({"value": {"anyOf": [s(10), i(0, 999), BOOL]}})),
    # -- arrays ----------------------------------------------------------------------------------
    ("array_strings", obj({"tags": arr(s(15), 5, 1)})),
    ("array_rgb", obj({"rgb": arr(i(0, 255), 3, 3)})),
    ("array_enum", obj({"days": arr({"enum": WEEKDAYS}, 5, 1)})),
    ("array_bools", obj({"flags": arr(BOOL, 4)})),
    (
        "prefix_items",
        obj(
            {
                "row": {
                    "type": "array",
                    "prefixItems": [s(10), i(0, 99), BOOL],
                    "items": False,
                    "minItems": 3,
                    "maxItems": 3,
                }
            }
        ),
    ),
    ("two_arrays", obj({"ints": arr(i(-9, 9), 5), "words": arr(s(12), 3)})),
    ("nested_arrays", obj({"matrix": arr(arr(i(0, 9), 3, 1), 3, 1)})),
    # -- nesting ---------------------------------------------------------------------------------
    ("nested_2", obj({"user": obj({"id": i(1, 99999), "name": s(30)}), "active": BOOL})),
    ("nested_3", obj({"order": obj({"customer": obj({"name": s(30), "email": EMAIL}), "total": num(0, 10000)})})),
    ("nested_4", obj({"a": obj({"b": obj({"c": obj({"d": s(10)})})})})),
    (
        "nested_optional",
        obj(
            {
                "user": s(20),
                "settings": obj({"theme": {"enum": ["light", "dark"]}, "notify": BOOL}, optional=("notify",)),
            },
            optional=("settings",),
        ),
    ),
    ("address", ADDRESS),
    ("array_of_objects", obj({"items": arr(obj({"sku": pat(r"^[A-Z]{2}[0-9]{4}$"), "qty": i(1, 99)}), 4, 1)})),
    # -- $defs and $ref --------------------------------------------------------------------------
    (
        "defs_point",
        {
            **obj({"start": ref("point"), "end": ref("point")}),
            "$defs": {"point": obj({"x": num(-1000, 1000), "y": num(-1000, 1000)})},
        },
    ),
    (
        "defs_polygon",
        {
            **obj({"name": s(20), "vertices": arr(ref("point"), 5, 3)}),
            "$defs": {"point": obj({"x": i(-100, 100), "y": i(-100, 100)})},
        },
    ),
    (
        "defs_chain",
        {
            **obj({"lines": arr(ref("line"), 3, 1), "total": ref("money")}),
            "$defs": {"money": MONEY, "line": obj({"desc": s(30), "price": ref("money")})},
        },
    ),
    # -- unions of objects -----------------------------------------------------------------------
    (
        "anyof_objects",
        obj(
            {
                "shape": {
                    "anyOf": [
                        obj({"kind": {"const": "circle"}, "radius": num(0, 100)}),
                        obj({"kind": {"const": "rect"}, "w": num(0, 100), "h": num(0, 100)}),
                    ]
                }
            }
        ),
    ),
    (
        "anyof_discriminated",
        obj(
            {
                "payment": {
                    "anyOf": [
                        obj({"method": {"const": "card"}, "last4": pat(r"^[0-9]{4}$")}),
                        obj({"method": {"const": "iban"}, "iban": pat(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,20}$")}),
                        obj({"method": {"const": "cash"}}),
                    ]
                }
            }
        ),
    ),
    ("anyof_string_or_array", obj({"to": {"anyOf": [EMAIL, arr(EMAIL, 3, 1)]}})),
    (
        "anyof_object_or_null",
        obj({"id": i(1, 999), "parent": {"anyOf": [obj({"id": i(1, 999), "name": s(20)}), NULL]}}),
    ),
    # -- trees of fixed depth (no recursion) -----------------------------------------------------
    (
        "tree_depth3",
        {
            **ref("n1"),
            "$defs": {
                "n3": obj({"label": s(12)}),
                "n2": obj({"label": s(12), "children": arr(ref("n3"), 3)}, optional=("children",)),
                "n1": obj({"label": s(12), "children": arr(ref("n2"), 3)}, optional=("children",)),
            },
        },
    ),
    (
        "tree_depth4",
        {
            **ref("n1"),
            "$defs": {
                "n4": obj({"id": i(0, 99)}),
                "n3": obj({"id": i(0, 99), "kids": arr(ref("n4"), 2)}),
                "n2": obj({"id": i(0, 99), "kids": arr(ref("n3"), 2)}),
                "n1": obj({"id": i(0, 99), "kids": arr(ref("n2"), 2)}),
            },
        },
    ),
    # -- realistic documents ---------------------------------------------------------------------
    ("wide_object", obj({f"f{k:02d}": [i(0, 999), BOOL, s(12)][k % 3] for k in range(20)})),
    (
        "log_entry",
        obj(
            {
                "date": DATE,
                "time": TIME,
                "level": {"enum": ["debug", "info", "warn", "error"]},
                "message": s(40),
                "tags": arr(s(10), 3),
                "context": {"anyOf": [obj({"request_id": pat(r"^[0-9a-f]{8}$"), "user": s(20)}), NULL]},
            }
        ),
    ),
    (
        "calendar_event",
        obj(
            {
                "title": s(40),
                "date": DATE,
                "start": TIME,
                "end": TIME,
                "attendees": arr(obj({"name": s(30), "email": EMAIL}), 4),
                "repeat": {"anyOf": [{"enum": ["daily", "weekly", "monthly"]}, NULL]},
            }
        ),
    ),
    (
        "recipe",
        obj(
            {
                "name": s(30),
                "servings": i(1, 12),
                "ingredients": arr(
                    obj(
                        {
                            "item": s(20),
                            "amount": num(0, 1000),
                            "unit": {"enum": ["g", "ml", "tsp", "tbsp", "cup", "piece"]},
                        }
                    ),
                    5,
                    1,
                ),
                "steps": arr(s(40), 5, 1),
                "vegetarian": BOOL,
            }
        ),
    ),
    (
        "api_response",
        obj(
            {
                "status": i(200, 599),
                "data": {"anyOf": [obj({"id": i(1, 99999), "name": s(30)}), NULL]},
                "errors": arr(obj({"code": pat(r"^E[0-9]{3}$"), "message": s(40)}), 3),
            }
        ),
    ),
    (
        "org_chart",
        obj(
            {
                "org": obj(
                    {
                        "name": s(30),
                        "teams": arr(
                            obj(
                                {
                                    "name": s(20),
                                    "members": arr(
                                        obj(
                                            {
                                                "name": s(20),
                                                "role": {"enum": ["lead", "dev", "qa", "pm"]},
                                                "since": i(2000, 2030),
                                            }
                                        ),
                                        3,
                                        1,
                                    ),
                                }
                            ),
                            3,
                            1,
                        ),
                    }
                )
            }
        ),
    ),
    (
        "geo_feature",
        obj(
            {
                "type": {"const": "Feature"},
                "geometry": {
                    "anyOf": [
                        obj({"type": {"const": "Point"}, "coordinates": arr(num(-180, 180), 2, 2)}),
                        obj({"type": {"const": "LineString"}, "coordinates": arr(arr(num(-180, 180), 2, 2), 4, 2)}),
                    ]
                },
                "properties": obj({"name": s(30), "elevation": {"anyOf": [i(-500, 9000), NULL]}}),
            }
        ),
    ),
    (
        "tool_call",
        obj(
            {
                "name": {"enum": ["get_weather", "search"]},
                "arguments": {
                    "anyOf": [
                        obj({"city": s(30), "unit": {"enum": ["c", "f"]}}, optional=("unit",)),
                        obj({"query": s(40), "limit": i(1, 10)}),
                    ]
                },
            }
        ),
    ),
    (
        "invoice",
        {
            **obj(
                {
                    "number": pat(r"^INV-[0-9]{6}$"),
                    "date": DATE,
                    "seller": ref("party"),
                    "buyer": ref("party"),
                    "lines": arr(ref("line"), 4, 1),
                    "total": ref("money"),
                    "paid": BOOL,
                    "note": s(40),
                },
                optional=("note",),
            ),
            "$defs": {
                "money": MONEY,
                "address": ADDRESS,
                "party": obj(
                    {"name": s(30), "vat": {"anyOf": [pat(r"^[A-Z]{2}[0-9]{8,11}$"), NULL]}, "address": ref("address")}
                ),
                "line": obj({"desc": s(30), "qty": i(1, 999), "unit_price": ref("money")}),
            },
        },
    ),
    (
        "kitchen_sink",
        {
            **obj(
                {
                    "id": pat(r"^[A-Z]{3}-[0-9]{2,4}$"),
                    "kind": {"const": "sink"},
                    "status": {"enum": ["new", "open", "done"]},
                    "priority": {"type": "integer", "exclusiveMinimum": 0, "maximum": 5},
                    "weight": num(0, 50),
                    "owner": {"anyOf": [ref("person"), NULL]},
                    "watchers": arr(ref("person"), 3),
                    "schedule": obj({"days": arr({"enum": WEEKDAYS}, 5, 1), "at": TIME}),
                    "meta": obj({"tags": arr(s(10), 5), "score": {"anyOf": [num(0, 1), NULL]}}, optional=("score",)),
                    "archived": BOOL,
                },
                optional=("watchers", "meta"),
            ),
            "$defs": {"person": obj({"name": s(30), "email": EMAIL})},
        },
    ),
]

EXAMPLES: dict[str, object] = {
    "flat_name": {"name": "Ada Lovelace"},
    "flat_person": {"name": "Grace", "age": 45, "active": True},
    "flat_mixed": {"title": "Quarterly report", "count": 12, "ratio": 0.75, "done": False},
    "flat_booleans": {"read": True, "write": False, "execute": False},
    "flat_date_parts": {"year": 2024, "month": 2, "day": 29},
    "string_lengths": {"code": "FR", "note": "", "label": "abcdefgh"},
    "negative_numbers": {"celsius": -12.5, "offset": -5, "depth": -300},
    "enum_color": {"color": "green"},
    "enum_mixed_types": {"level": None},
    "const_fields": {"version": "v1", "kind": 3, "name": "widget"},
    "enum_country": {"country": "JP", "city": "Kyoto"},
    "pattern_ticket": {"ticket": "ABC-1234"},
    "pattern_date": {"date": "2025-11-30"},
    "pattern_hex_color": {"fg": "#1a2b3c", "bg": "#ffffff"},
    "pattern_semver": {"package": "kiln", "version": "1.12.0"},
    "pattern_email": {"email": "ada@example.org"},
    "pattern_alternation": {"method": "POST", "path": "/api/users"},
    "number_bounds": {"temperature": 21.5, "humidity": 40},
    "exclusive_bounds": {"score": 9.5, "rank": 1},
    "multiple_of": {"minutes": 45},
    "optional_props": {"name": "Linus", "age": 30},
    "all_optional": {},
    "nullable_type_list": {"first": "John", "middle": None},
    "anyof_null": {"score": 88},
    "anyof_scalars": {"value": "maybe"},
    "array_strings": {"tags": ["fast", "cpu", "llm"]},
    "array_rgb": {"rgb": [255, 128, 0]},
    "array_enum": {"days": ["mon", "wed", "fri"]},
    "array_bools": {"flags": [True, False]},
    "prefix_items": {"row": ["alpha", 7, True]},
    "two_arrays": {"ints": [-3, 0, 9], "words": ["hello", "world"]},
    "nested_arrays": {"matrix": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]},
    "nested_2": {"user": {"id": 42, "name": "Alan"}, "active": True},
    "nested_3": {"order": {"customer": {"name": "Edsger", "email": "edsger@cs.org"}, "total": 99.9}},
    "nested_4": {"a": {"b": {"c": {"d": "deep"}}}},
    "nested_optional": {"user": "margaret", "settings": {"theme": "dark"}},
    "address": {"street": "1 Rue de Rivoli", "city": "Paris", "zip": "75001", "country": "FR"},
    "array_of_objects": {"items": [{"sku": "AB1234", "qty": 2}, {"sku": "ZX0001", "qty": 10}]},
    "defs_point": {"start": {"x": 0, "y": 0}, "end": {"x": 12.5, "y": -3}},
    "defs_polygon": {"name": "triangle", "vertices": [{"x": 0, "y": 0}, {"x": 10, "y": 0}, {"x": 5, "y": 8}]},
    "defs_chain": {
        "lines": [{"desc": "coffee", "price": {"amount": 3.5, "currency": "EUR"}}],
        "total": {"amount": 3.5, "currency": "EUR"},
    },
    "anyof_objects": {"shape": {"kind": "rect", "w": 4, "h": 2.5}},
    "anyof_discriminated": {"payment": {"method": "card", "last4": "4242"}},
    "anyof_string_or_array": {"to": ["ops@kiln.org", "dev@kiln.org"]},
    "anyof_object_or_null": {"id": 7, "parent": {"id": 1, "name": "root"}},
    "tree_depth3": {
        "label": "root",
        "children": [{"label": "a", "children": [{"label": "a1"}, {"label": "a2"}]}, {"label": "b"}],
    },
    "tree_depth4": {"id": 1, "kids": [{"id": 2, "kids": [{"id": 3, "kids": [{"id": 4}]}]}]},
    "wide_object": {f"f{k:02d}": [k * 10, k % 2 == 0, f"v{k}"][k % 3] for k in range(20)},
    "log_entry": {
        "date": "2025-01-15",
        "time": "08:30",
        "level": "warn",
        "message": "disk almost full",
        "tags": ["disk", "node3"],
        "context": {"request_id": "deadbeef", "user": "ops"},
    },
    "calendar_event": {
        "title": "Design review",
        "date": "2025-03-04",
        "start": "14:00",
        "end": "15:30",
        "attendees": [{"name": "Ada", "email": "ada@kiln.org"}],
        "repeat": "weekly",
    },
    "recipe": {
        "name": "Pancakes",
        "servings": 4,
        "ingredients": [
            {"item": "flour", "amount": 250, "unit": "g"},
            {"item": "milk", "amount": 500, "unit": "ml"},
            {"item": "egg", "amount": 2, "unit": "piece"},
        ],
        "steps": ["Whisk everything together", "Fry in a hot pan"],
        "vegetarian": True,
    },
    "api_response": {"status": 404, "data": None, "errors": [{"code": "E404", "message": "user not found"}]},
    "org_chart": {
        "org": {
            "name": "Kiln Labs",
            "teams": [
                {
                    "name": "runtime",
                    "members": [
                        {"name": "Ada", "role": "lead", "since": 2021},
                        {"name": "Bob", "role": "dev", "since": 2023},
                    ],
                }
            ],
        }
    },
    "geo_feature": {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [2.35, 48.85]},
        "properties": {"name": "Paris", "elevation": 35},
    },
    "tool_call": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}},
    "invoice": {
        "number": "INV-000123",
        "date": "2025-06-01",
        "seller": {
            "name": "Kiln GmbH",
            "vat": "DE123456789",
            "address": {"street": "Hauptstr. 5", "city": "Berlin", "zip": "10115", "country": "DE"},
        },
        "buyer": {
            "name": "Ada Inc",
            "vat": None,
            "address": {"street": "1 Main St", "city": "Boston", "zip": "02108", "country": "US"},
        },
        "lines": [{"desc": "GPU hours", "qty": 10, "unit_price": {"amount": 2.5, "currency": "EUR"}}],
        "total": {"amount": 25, "currency": "EUR"},
        "paid": False,
    },
    "kitchen_sink": {
        "id": "KIT-42",
        "kind": "sink",
        "status": "open",
        "priority": 3,
        "weight": 12.5,
        "owner": {"name": "Ada", "email": "ada@kiln.org"},
        "watchers": [{"name": "Bob", "email": "bob@kiln.org"}],
        "schedule": {"days": ["mon", "thu"], "at": "09:15"},
        "meta": {"tags": ["urgent"], "score": 0.5},
        "archived": False,
    },
}
