"""The business calendar computed directly (workflows/calendar.py): business days and hours
across nights, weekends, holidays and DST changes, in zones east and west of UTC, and the
validation of calendars and durations as policy data."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from workflows.calendar import (
    MAX_SPAN_DAYS,
    BusinessCalendar,
    BusinessDuration,
    CalendarError,
    HolidaySource,
    WorkingHours,
    due,
    local_isoformat,
)

BUCHAREST = ZoneInfo("Europe/Bucharest")
NEW_YORK = ZoneInfo("America/New_York")
RO = BusinessCalendar(timezone="Europe/Bucharest", holidays=HolidaySource(country="RO"))


def d(text: str) -> BusinessDuration:
    return BusinessDuration.parse(text)


def local(instant: datetime, zone: ZoneInfo = BUCHAREST) -> datetime:
    return instant.astimezone(zone)


class Doc(BaseModel):
    """A policy-like document holding a calendar and a duration, for error locations."""

    model_config = ConfigDict(extra="forbid")

    calendar: BusinessCalendar = BusinessCalendar()
    within: BusinessDuration = BusinessDuration(days=1)


def error_at(data: dict) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as info:
        Doc.model_validate(data)
    return {tuple(e["loc"]): e["msg"] for e in info.value.errors()}


# ----------------------------------------------------------------------------- business days
def test_friday_evening_plus_two_business_days_is_tuesday_evening_across_october_change():
    start = datetime(2027, 10, 29, 17, 0, tzinfo=BUCHAREST)
    assert start.utcoffset() == timedelta(hours=3)  # EEST, before the change on October 31

    result = due(RO, start, d("P2D"))

    assert result.tzinfo == UTC
    assert start.astimezone(UTC) == datetime(2027, 10, 29, 14, 0, tzinfo=UTC)
    assert result == datetime(2027, 11, 2, 15, 0, tzinfo=UTC)  # 17:00 EET (+02:00)
    assert local(result).replace(tzinfo=None) == datetime(2027, 11, 2, 17, 0)
    assert local_isoformat(RO, result) == "2027-11-02T17:00:00+02:00"
    # two business days are not 48 hours, nor 4 x 24 hours of wall time
    assert result - start == timedelta(days=4, hours=1)


def test_a_holiday_on_monday_moves_the_due_a_day():
    calendar = BusinessCalendar.model_validate(RO.model_dump() | {"extra_holidays": ["2027-11-01"]})
    start = datetime(2027, 10, 29, 17, 0, tzinfo=BUCHAREST)

    result = due(calendar, start, d("P2D"))

    assert result == datetime(2027, 11, 3, 15, 0, tzinfo=UTC)
    assert local_isoformat(calendar, result) == "2027-11-03T17:00:00+02:00"


def test_the_libraries_holidays_move_the_due():
    # St Andrew's Day (Nov 30) and the National Day (Dec 1) are Romanian public holidays
    start = datetime(2027, 11, 26, 10, 0, tzinfo=BUCHAREST)  # a Friday
    without = BusinessCalendar(timezone="Europe/Bucharest")

    assert local(due(without, start, d("P2D"))) == datetime(2027, 11, 30, 10, tzinfo=BUCHAREST)
    assert local(due(RO, start, d("P2D"))) == datetime(2027, 12, 2, 10, tzinfo=BUCHAREST)
    assert local(due(RO, start, d("PT16H"))) == datetime(2027, 12, 2, 10, tzinfo=BUCHAREST)


def test_an_extra_working_day_counts_even_on_a_weekend_or_holiday():
    saturday, national_day = date(2027, 10, 30), date(2027, 12, 1)
    calendar = BusinessCalendar.model_validate(
        RO.model_dump() | {"extra_working_days": [saturday, national_day]}
    )

    friday = datetime(2027, 10, 29, 17, 0, tzinfo=BUCHAREST)
    assert local(due(calendar, friday, d("P1D"))) == datetime(2027, 10, 30, 17, tzinfo=BUCHAREST)
    monday = datetime(2027, 11, 29, 12, 0, tzinfo=BUCHAREST)  # Tue 30 is still a holiday
    assert local(due(calendar, monday, d("P1D"))) == datetime(2027, 12, 1, 12, tzinfo=BUCHAREST)


# ----------------------------------------------------------------------------- business hours
def test_business_hours_skip_the_night_the_weekend_and_the_dst_change():
    start = datetime(2027, 10, 29, 16, 0, tzinfo=BUCHAREST)  # 13:00 UTC

    result = due(RO, start, d("PT4H"))  # 1 h on Friday, 3 h on Monday

    assert result == datetime(2027, 11, 1, 10, 0, tzinfo=UTC)  # 12:00 EET
    assert local(result).replace(tzinfo=None) == datetime(2027, 11, 1, 12, 0)
    assert local(due(RO, start, d("PT30M"))) == datetime(2027, 10, 29, 16, 30, tzinfo=BUCHAREST)
    # a day and then hours: Monday 16:00, then 1 h to closing and 2 h on Tuesday
    assert local(due(RO, start, d("P1DT3H"))) == datetime(2027, 11, 2, 11, tzinfo=BUCHAREST)


def test_business_hours_count_elapsed_time_on_the_night_the_clocks_go_back():
    # a night shift 01:00-06:00 on Sunday 2027-10-31, when 04:00 EEST becomes 03:00 EET:
    # that night holds 6 hours of working time, not 5
    night = BusinessCalendar(
        timezone="Europe/Bucharest",
        working_days=("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
        hours=WorkingHours(start=time(1), end=time(6)),
    )
    start = datetime(2027, 10, 31, 1, 0, tzinfo=BUCHAREST)
    assert start.astimezone(UTC) == datetime(2027, 10, 30, 22, 0, tzinfo=UTC)

    five = due(night, start, d("PT5H"))
    assert five == datetime(2027, 10, 31, 3, 0, tzinfo=UTC)
    assert local(five).replace(tzinfo=None) == datetime(2027, 10, 31, 5, 0)  # 4 h of wall time
    six = due(night, start, d("PT6H"))  # ends exactly at the closing: stays there
    assert local(six).replace(tzinfo=None) == datetime(2027, 10, 31, 6, 0)
    seven = due(night, start, d("PT7H"))  # the 7th hour is Monday's first
    assert local(seven).replace(tzinfo=None) == datetime(2027, 11, 1, 2, 0)


def test_a_zone_west_of_utc_across_the_spring_change():
    # New York moves from EST (-05:00) to EDT (-04:00) on Sunday 2027-03-14
    us = BusinessCalendar(timezone="America/New_York", holidays=HolidaySource(country="US"))
    friday = datetime(2027, 3, 12, 15, 0, tzinfo=NEW_YORK)
    assert friday.astimezone(UTC) == datetime(2027, 3, 12, 20, 0, tzinfo=UTC)

    next_day = due(us, friday, d("P1D"))
    assert next_day == datetime(2027, 3, 15, 19, 0, tzinfo=UTC)
    assert local_isoformat(us, next_day) == "2027-03-15T15:00:00-04:00"

    hours = due(us, friday, d("PT4H"))  # 2 h on Friday, 2 h on Monday
    assert hours == datetime(2027, 3, 15, 15, 0, tzinfo=UTC)
    assert local_isoformat(us, hours) == "2027-03-15T11:00:00-04:00"


def test_a_zone_west_of_utc_with_the_holidays_of_a_country_and_a_subdivision():
    wednesday = datetime(2027, 11, 24, 15, 0, tzinfo=NEW_YORK)  # Thanksgiving is Thursday
    us = BusinessCalendar(timezone="America/New_York", holidays=HolidaySource(country="US"))
    california = BusinessCalendar(
        timezone="America/New_York", holidays=HolidaySource(country="US", subdivision="CA")
    )

    assert due(us, wednesday, d("P1D")) == datetime(2027, 11, 26, 20, 0, tzinfo=UTC)
    # California also rests the day after Thanksgiving
    assert local_isoformat(california, due(california, wednesday, d("P1D"))) == (
        "2027-11-29T15:00:00-05:00"
    )


# ----------------------------------------------------------------------------- outside hours
@pytest.mark.parametrize(
    ("start", "duration", "expected"),
    [
        # business days from outside working time: the closing of the n-th working day,
        # counting the next opening's day as the first
        ((2027, 10, 30, 10, 0), "P1D", (2027, 11, 1, 17, 0)),  # Saturday -> Monday's close
        ((2027, 11, 1, 7, 0), "P1D", (2027, 11, 1, 17, 0)),  # Monday before opening
        ((2027, 10, 29, 18, 0), "P2D", (2027, 11, 2, 17, 0)),  # Friday after closing
        ((2027, 10, 29, 18, 0), "P1DT2H", (2027, 11, 2, 11, 0)),  # close of Monday + 2 h
        # in working time, the same wall-clock time on the n-th following working day
        ((2027, 11, 1, 9, 0), "P1D", (2027, 11, 2, 9, 0)),  # at the opening
        ((2027, 10, 29, 17, 0), "P1D", (2027, 11, 1, 17, 0)),  # at the closing
        # business hours from outside working time start at the next opening
        ((2027, 10, 30, 10, 0), "PT2H", (2027, 11, 1, 11, 0)),  # Saturday
        ((2027, 11, 1, 8, 0), "PT30M", (2027, 11, 1, 9, 30)),  # Monday before opening
        ((2027, 10, 29, 17, 0), "PT1H", (2027, 11, 1, 10, 0)),  # Friday at the closing
        ((2027, 10, 29, 16, 0), "PT1H", (2027, 10, 29, 17, 0)),  # ends on the closing
        ((2027, 10, 30, 10, 0), "PT8H", (2027, 11, 1, 17, 0)),  # a whole working day
    ],
)
def test_a_start_outside_working_hours_counts_from_the_next_opening(start, duration, expected):
    result = due(RO, datetime(*start).replace(tzinfo=BUCHAREST), d(duration))
    assert local(result).replace(tzinfo=None) == datetime(*expected)


def test_a_start_a_moment_after_closing_gives_the_same_due_as_the_closing():
    closing = datetime(2027, 10, 29, 17, 0, tzinfo=BUCHAREST)
    later = closing + timedelta(milliseconds=20)
    assert due(RO, later, d("P2D")) == due(RO, closing, d("P2D"))


def test_the_default_calendar_is_weekdays_nine_to_five_utc_without_holidays():
    calendar = BusinessCalendar()
    assert calendar.timezone == "UTC"
    assert calendar.working_days == ("mon", "tue", "wed", "thu", "fri")
    assert (calendar.hours.start, calendar.hours.end) == (time(9), time(17))
    assert calendar.holidays is None
    friday = datetime(2027, 12, 24, 12, 0, tzinfo=UTC)  # Christmas Eve, a Friday
    assert due(calendar, friday, d("P1D")) == datetime(2027, 12, 27, 12, 0, tzinfo=UTC)
    assert due(calendar, friday, d("PT6H")) == datetime(2027, 12, 27, 10, 0, tzinfo=UTC)


def test_a_start_in_another_zone_is_the_same_instant():
    in_utc = datetime(2027, 10, 29, 14, 0, tzinfo=UTC)  # Friday 17:00 in Bucharest
    assert due(RO, in_utc, d("P2D")) == datetime(2027, 11, 2, 15, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------- determinism
def test_the_same_input_gives_the_same_output():
    start = datetime(2027, 11, 26, 10, 0, tzinfo=BUCHAREST)
    first = [due(RO, start, d(x)) for x in ("P2D", "PT4H", "P1DT2H", "P40D")]
    # another object built from the same data, asked in another order (other years first)
    again = BusinessCalendar.model_validate_json(RO.model_dump_json())
    far = due(again, datetime(2031, 5, 1, 9, tzinfo=BUCHAREST), d("P300D"))
    second = [due(again, start, d(x)) for x in ("P2D", "PT4H", "P1DT2H", "P40D")]
    assert first == second
    assert far == due(RO, datetime(2031, 5, 1, 9, tzinfo=BUCHAREST), d("P300D"))
    assert again == RO and hash(again) == hash(RO)
    assert copy.deepcopy(RO) == RO


def test_no_due_within_the_span_is_refused():
    meagre = BusinessCalendar(
        working_days=("sun",), hours=WorkingHours(start=time(9), end=time(9, 1))
    )
    with pytest.raises(CalendarError, match=f"within {MAX_SPAN_DAYS} days"):
        due(meagre, datetime(2027, 1, 1, tzinfo=UTC), d("PT8784H"))


def test_a_naive_start_is_refused():
    with pytest.raises(CalendarError, match="timezone-aware"):
        due(RO, datetime(2027, 10, 29, 17, 0), d("P2D"))
    with pytest.raises(CalendarError, match="timezone-aware"):
        local_isoformat(RO, datetime(2027, 10, 29, 17, 0))


# ----------------------------------------------------------------------------- durations
@pytest.mark.parametrize(
    ("text", "days", "minutes", "shown"),
    [
        ("P2D", 2, 0, "P2D"),
        ("PT4H", 0, 240, "PT4H"),
        ("P1DT2H", 1, 120, "P1DT2H"),
        ("PT30M", 0, 30, "PT30M"),
        ("PT90M", 0, 90, "PT1H30M"),
        ("P366D", 366, 0, "P366D"),
        ("PT8784H", 0, 8784 * 60, "PT8784H"),
    ],
)
def test_business_durations_are_written_in_iso_8601(text, days, minutes, shown):
    duration = BusinessDuration.parse(text)
    assert (duration.days, duration.minutes) == (days, minutes)
    assert str(duration) == shown
    assert Doc(within=duration).model_dump(mode="json")["within"] == shown
    assert Doc.model_validate_json(Doc(within=duration).model_dump_json()).within == duration


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("P0D", "must not be zero"),
        ("PT0H0M", "must not be zero"),
        ("-P2D", "is not a business duration"),
        ("P", "is not a business duration"),
        ("PT", "is not a business duration"),
        ("P2DT", "is not a business duration"),
        ("P1W", "is not a business duration"),
        ("P1M", "is not a business duration"),  # a month in ISO 8601, not a minute
        ("PT10S", "is not a business duration"),
        ("2 days", "is not a business duration"),
        ("P367D", "too long"),
        ("PT8785H", "too long"),
    ],
)
def test_bad_business_durations_are_refused_naming_the_field(text, fragment):
    errors = error_at({"within": text})
    assert list(errors) == [("within",)]
    assert fragment in errors[("within",)]


def test_a_business_duration_has_a_string_json_schema():
    schema = Doc.model_json_schema()["$defs"]["BusinessDuration"]
    assert schema["type"] == "string"
    assert "P2D" in schema["examples"]


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "Europe/Bucuresti", "../etc/passwd", ""])
def test_an_unknown_time_zone_is_refused(zone):
    errors = error_at({"calendar": {"timezone": zone}})
    assert list(errors) == [("calendar", "timezone")]
    assert "IANA time zone" in errors[("calendar", "timezone")]


def test_working_hours_must_end_after_they_start():
    errors = error_at({"calendar": {"hours": {"start": "17:00", "end": "09:00"}}})
    assert list(errors) == [("calendar", "hours", "end")]
    assert "must be after start" in errors[("calendar", "hours", "end")]
    errors = error_at({"calendar": {"hours": {"start": "09:00", "end": "09:00"}}})
    assert list(errors) == [("calendar", "hours", "end")]


def test_working_hours_are_local_times_without_offset():
    errors = error_at({"calendar": {"hours": {"start": "09:00+02:00", "end": "17:00"}}})
    assert list(errors) == [("calendar", "hours", "start")]


def test_an_unknown_country_or_subdivision_is_refused():
    errors = error_at({"calendar": {"holidays": {"country": "ZZ"}}})
    assert list(errors) == [("calendar", "holidays", "country")]
    assert "knows no country 'ZZ'" in errors[("calendar", "holidays", "country")]

    errors = error_at({"calendar": {"holidays": {"country": "US", "subdivision": "XX"}}})
    assert list(errors) == [("calendar", "holidays", "subdivision")]
    message = errors[("calendar", "holidays", "subdivision")]
    assert "no subdivision 'XX' of US" in message and "CA" in message

    errors = error_at({"calendar": {"holidays": {"country": "RO", "subdivision": "B"}}})
    assert "known: none" in errors[("calendar", "holidays", "subdivision")]


def test_working_days_are_weekday_names_listed_once():
    errors = error_at({"calendar": {"working_days": ["mon", "mon"]}})
    assert list(errors) == [("calendar", "working_days", 1)]
    errors = error_at({"calendar": {"working_days": ["monday"]}})
    assert list(errors) == [("calendar", "working_days", 0)]
    errors = error_at({"calendar": {"working_days": []}})
    assert errors == {("calendar", "working_days"): "at least one day must be a working day"}


def test_extra_dates_are_listed_once_and_not_both_holiday_and_working_day():
    errors = error_at({"calendar": {"extra_holidays": ["2027-11-01", "2027-11-01"]}})
    assert list(errors) == [("calendar", "extra_holidays", 1)]
    errors = error_at(
        {
            "calendar": {
                "extra_holidays": ["2027-11-01"],
                "extra_working_days": ["2027-10-30", "2027-11-01"],
            }
        }
    )
    assert list(errors) == [("calendar", "extra_working_days", 1)]
    assert "also listed in extra_holidays" in errors[("calendar", "extra_working_days", 1)]


def test_unknown_keys_are_refused():
    errors = error_at({"calendar": {"time_zone": "UTC"}})
    assert list(errors) == [("calendar", "time_zone")]
    errors = error_at({"calendar": {"holidays": {"country": "RO", "region": "B"}}})
    assert list(errors) == [("calendar", "holidays", "region")]


def test_a_calendar_is_frozen_policy_data_that_round_trips_through_json():
    calendar = BusinessCalendar(
        timezone="America/New_York",
        working_days=("mon", "tue", "wed", "thu"),
        hours=WorkingHours(start=time(8, 30), end=time(16)),
        holidays=HolidaySource(country="US", subdivision="CA"),
        extra_holidays=(date(2027, 12, 24),),
        extra_working_days=(date(2027, 10, 30),),
    )
    again = BusinessCalendar.model_validate_json(calendar.model_dump_json())
    assert again == calendar
    with pytest.raises(ValidationError):
        calendar.timezone = "UTC"  # type: ignore[misc]
