"""Triggers: schedules, file drops, email, MQTT, database changes and alerts as events."""
