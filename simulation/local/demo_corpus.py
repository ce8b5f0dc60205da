"""The built-in demo corpus: SYNTHETIC enterprise requests, generated from templates.

Nothing here comes from a real company or person. Sentences are filled in from the phrase
lists below with a fixed seed, so every install produces the same ~960 records: four
departments (it, hr, finance, facilities) of four intents each, with a ``department`` column.
It exists so that ``fedpriv simulate`` runs with no data at all; it says nothing about
accuracy on real traffic.
"""

from __future__ import annotations

import random

from shared.data import Record

DESCRIPTION = (
    "fedpriv demo corpus: SYNTHETIC enterprise requests generated from templates "
    "(4 departments x 4 intents); not real data"
)
RECORDS_PER_INTENT = 60

_OPENERS = ["", "hi, ", "hello, ", "quick question: ", "urgent: ", "please help, ", "good morning, "]
_CLOSERS = ["", " thanks", " asap", " please", " thank you", " today if possible", " when you can"]

_INTENTS: dict[str, dict[str, list[str]]] = {
    "it": {
        "password_reset": [
            "i forgot my {system} password", "reset my {system} password", "my {system} account is locked",
            "can't log in to {system}, password expired", "need a new password for {system}",
            "locked out of {system} after too many attempts",
        ],
        "vpn_access": [
            "vpn keeps disconnecting from {place}", "how do i connect to the vpn from {place}",
            "request vpn access for working from {place}", "vpn client fails to start on my laptop",
            "cannot reach internal sites over vpn from {place}",
        ],
        "laptop_issue": [
            "my laptop screen is {fault}", "laptop battery is {fault}", "the keyboard on my laptop is {fault}",
            "my work laptop is {fault} and very slow", "laptop fan is {fault}",
        ],
        "software_install": [
            "please install {software} on my machine", "need a license for {software}",
            "how do i get {software} installed", "request {software} for my team",
            "{software} installation failed with an error",
        ],
    },
    "hr": {
        "leave_request": [
            "i want to take {days} days of vacation", "how do i request {days} days of leave",
            "submit parental leave starting next month", "can i carry over {days} vacation days",
            "need sick leave for {days} days",
        ],
        "payroll_question": [
            "my payslip for {month} looks wrong", "when is salary paid in {month}",
            "overtime missing from my {month} pay", "tax deduction on my {month} payslip is too high",
            "why was my {month} salary late",
        ],
        "benefits_enrollment": [
            "how do i enroll in the {benefit}", "add my partner to the {benefit}",
            "deadline for {benefit} enrollment", "change my {benefit} options",
            "what does the {benefit} cover",
        ],
        "onboarding": [
            "new hire starting {month}, what do they need", "onboarding checklist for a new {role}",
            "first day schedule for the new {role}", "who prepares the contract for our new {role}",
            "orientation session for new {role} hires",
        ],
    },
    "finance": {
        "expense_report": [
            "how do i file expenses for my trip to {city}", "expense report for the {city} conference",
            "reimburse my taxi receipts from {city}", "my expense claim for {city} was rejected",
            "submit hotel costs from {city}",
        ],
        "invoice_status": [
            "has invoice {number} from our supplier been paid", "status of invoice {number}",
            "vendor says invoice {number} is overdue", "when will invoice {number} be settled",
            "invoice {number} was sent twice",
        ],
        "purchase_order": [
            "raise a purchase order for {item}", "need a po for {item}", "approve purchase of {item}",
            "how do i order {item} for the team", "purchase order for {item} is stuck",
        ],
        "budget_approval": [
            "approve the {quarter} budget for marketing", "request extra budget for {quarter}",
            "who signs off the {quarter} forecast", "our team is over budget in {quarter}",
            "submit the {quarter} budget plan",
        ],
    },
    "facilities": {
        "room_booking": [
            "book a meeting room for {people} people", "reserve the boardroom on {weekday}",
            "need a room with a projector on {weekday}", "cancel my room booking on {weekday}",
            "find a free room for {people} people",
        ],
        "maintenance_request": [
            "the {fixture} in the office is {fault}", "please fix the {fixture} on floor {floor}",
            "{fixture} on floor {floor} is {fault}", "report a {fault} {fixture}",
            "someone should look at the {fixture} near the kitchen",
        ],
        "parking_permit": [
            "apply for a parking permit", "my parking badge expired", "is there parking for visitors on {weekday}",
            "request an electric car charging spot", "lost my parking permit",
        ],
        "badge_access": [
            "my badge does not open floor {floor}", "need access to the server room",
            "lost my access badge", "temporary badge for a visitor on {weekday}",
            "badge reader on floor {floor} is {fault}",
        ],
    },
}

_SLOTS: dict[str, list[str]] = {
    "system": ["email", "sso", "crm", "erp", "wiki", "windows", "jira"],
    "place": ["home", "the hotel", "a client site", "the airport", "abroad"],
    "fault": ["broken", "not working", "flickering", "making noise", "dead", "cracked"],
    "software": ["excel", "photoshop", "python", "tableau", "visio", "zoom", "slack"],
    "days": ["two", "three", "five", "ten", "a few"],
    "month": ["january", "march", "june", "september", "november", "december"],
    "benefit": ["health plan", "dental plan", "pension scheme", "gym program", "life insurance"],
    "role": ["engineer", "analyst", "intern", "manager", "designer"],
    "city": ["london", "berlin", "new york", "paris", "tokyo", "madrid"],
    "number": ["4411", "8720", "1093", "5512", "7730", "2281"],
    "item": ["new monitors", "office chairs", "software licenses", "a laptop", "training courses"],
    "quarter": ["q1", "q2", "q3", "q4", "next quarter"],
    "people": ["four", "six", "ten", "twenty"],
    "weekday": ["monday", "tuesday", "wednesday", "thursday", "friday"],
    "fixture": ["air conditioning", "printer", "light", "heater", "door", "elevator"],
    "floor": ["two", "three", "five", "seven"],
}


def demo_label_scopes() -> dict[str, tuple[str, ...]]:
    """Each demo department's intents: part of the corpus's design, so public (client.label_scope)."""
    return {department: tuple(intents) for department, intents in _INTENTS.items()}


def demo_records(seed: int = 0) -> list[Record]:
    """All demo records, each tagged with its department; identical for the same seed."""
    rng = random.Random(seed)
    records: list[Record] = []
    for department, intents in _INTENTS.items():
        for intent, templates in intents.items():
            for i in range(RECORDS_PER_INTENT):
                body = rng.choice(templates).format(**{k: rng.choice(v) for k, v in _SLOTS.items()})
                text = f"{rng.choice(_OPENERS)}{body}{rng.choice(_CLOSERS)}"
                records.append(Record(text, intent, department, f"demo:{department}/{intent}[{i}]"))
    return records
