"""Activities, grouped by side effect. Each class receives its clients in its constructor."""
