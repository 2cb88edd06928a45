"""The verification gate's text checks one by one: what each must veto and what it must let
through. Pure text, no model: each case names the check and the pair."""

from __future__ import annotations

import pytest

from kvcellar.semantic.verify import (
    EntityCheck,
    NegationCheck,
    NumberDateCheck,
    QuestionTypeCheck,
    ScopeCheck,
    SubstitutionCheck,
    VerificationGate,
)

VETO = [
    (NegationCheck(), "How do I disable two-factor authentication?",
     "How do I turn on two-factor authentication?"),
    (NegationCheck(), "switch off dark mode", "How do I enable dark mode?"),
    (NumberDateCheck(), "Convert 20 degrees Celsius to Fahrenheit.",
     "Convert 20 degrees Fahrenheit to Celsius."),
    (NumberDateCheck(), "Is the subway running at 3 am?", "Is the subway running at 3 pm?"),
    (NumberDateCheck(), "Meet at 12 pm", "Meet at 12 am"),
    (NumberDateCheck(), "a 5 km run", "a 5 mile run"),
    (SubstitutionCheck(), "What is the chemical symbol for gold?",
     "What is the chemical symbol for silver?"),
    (SubstitutionCheck(), "How do I delete a local git branch?",
     "How do I delete a remote git branch?"),
    (SubstitutionCheck(), "What's the largest city in Canada?",
     "What is the largest province in Canada?"),
    (NegationCheck(), "How do I disable 2FA?", "How do I set up 2FA on my phone?"),
    (NegationCheck(), "How do I enable strict mode in TypeScript?",
     "how can i switch typescript strict mode off"),
    (NegationCheck(), "How do I enable read receipts in WhatsApp?",
     "what's the way to stop whatsapp from sending read receipts"),
    (NegationCheck(), "Round 4.65 up to one decimal place.", "Round 4.65 down to one decimal place."),
    (SubstitutionCheck(), "How do I get rid of ants in the kitchen?",
     "How do I get rid of fruit flies in the kitchen?"),
    (QuestionTypeCheck(), "Why can't I change my username?", "How do I change my username?"),
    # a bare answer in an earlier turn: the whole text is the thing
    (SubstitutionCheck(), "Canberra.", "Sydney."),
    # a reply's verdict, however the rest is worded
    (NegationCheck(), "Yes, as long as it hasn't shipped you can change the address.",
     "No, once an order is placed the address can't be changed, but you can cancel it."),
    # words inserted into an otherwise unchanged question narrow it
    (ScopeCheck(), "How do I read a file in Python?", "How do I read a binary file in Python?"),
    (ScopeCheck(), "How do I sort a list in Python?",
     "How do I sort a list in reverse order in Python?"),
]
PASS = [
    (NegationCheck(), "turn off wifi", "switch off the wifi"),
    (NegationCheck(), "How do I turn on 2FA?", "How do I enable two-factor authentication?"),
    (NumberDateCheck(), "Convert 100 degrees Fahrenheit to Celsius.", "What is 100°F in Celsius?"),
    (NumberDateCheck(), "Convert 30 degrees Celsius to Fahrenheit.", "What is 30 °C in °F?"),
    (NumberDateCheck(), "A train travels 60 miles per hour for 3 hours. How far does it go?",
     "A train moves at 60 mph for three hours. What distance does it cover?"),
    (NumberDateCheck(), "What's the time in Tokyo when it's noon in London?",
     "If it is 12pm in London, what time is it in Tokyo?"),
    (EntityCheck(), "Convert 100 degrees Fahrenheit to Celsius.", "What is 100°F in Celsius?"),
    # a one-word difference inside a rephrased sentence is a rewording, not a swap
    (SubstitutionCheck(), "Who wrote Pride and Prejudice?", "who is the author of pride and prejudice"),
    (SubstitutionCheck(), "How old is the universe?", "What is the age of the universe?"),
    (QuestionTypeCheck(), "How do I download my invoice?", "Where can I download my invoice?"),
    (QuestionTypeCheck(), "how come the sky is blue", "why is the sky blue"),
    # words added while the rest was rephrased are left to the content check
    (ScopeCheck(), "Why did the Roman Empire fall?",
     "What were the causes of the fall of the Roman Empire?"),
    (SubstitutionCheck(), "What is the square root of 144?", "sqrt of 144?"),
    (SubstitutionCheck(), "How many ounces are in a pound?", "How many oz make up one lb?"),
    (SubstitutionCheck(), "What foods help with constipation?",
     "What can I eat to relieve constipation?"),
    (SubstitutionCheck(), "How many centimeters are in an inch?", "how many cm in one inch"),
    (NegationCheck(), "Yes, you can change it until the order ships.",
     "Yep: until the order ships, the address can be edited."),
    (NegationCheck(), "No problem, I can help with that.", "Sure, I can help with that."),
    (SubstitutionCheck(), "Paris.", "It's Paris."),
    # "I've" mid-sentence is the speaker, not a name
    (EntityCheck(), "I'm flying to Tokyo next month.", "Next month I've got a flight to Tokyo."),
]


@pytest.mark.parametrize(("check", "query", "candidate"), VETO)
def test_check_vetoes(check, query, candidate):
    assert check(query, candidate) is not None
    assert check(candidate, query) is not None


@pytest.mark.parametrize(("check", "query", "candidate"), PASS)
def test_check_lets_through(check, query, candidate):
    assert check(query, candidate) is None
    assert check(candidate, query) is None


def test_earlier_turns_held_to_facts_and_swaps_not_to_wording():
    gate = VerificationGate([NegationCheck(), NumberDateCheck(), EntityCheck(), SubstitutionCheck(),
                             ScopeCheck()])
    q = "Can you show me an example?"
    same = gate.verify(q, q, ["user: I'm looking at hotels in Lisbon for next weekend."],
                       ["user: I'm looking at hotels in Lisbon for next weekend!"])
    assert same.ok
    swapped = gate.verify(q, q, ["user: I'm looking at hotels in Lisbon for next weekend."],
                          ["user: I'm looking at flights in Lisbon for next weekend."])
    assert not swapped.ok and swapped.check == "substitution"
    # a reply reworded without a figure the other states is not a conflict; two figures are
    dropped = gate.verify(q, q, ["user: Convert 10 miles to km.", "assistant: 10 miles is 16.09 km."],
                          ["user: Convert 10 miles to km.", "assistant: That's roughly 16.09 km."])
    assert dropped.ok
    differ = gate.verify(q, q, ["user: Convert 10 miles to km.", "assistant: It is 16.09 km."],
                         ["user: Convert 10 miles to km.", "assistant: It is 18.2 km."])
    assert not differ.ok and differ.check == "numbers"
    idiom = gate.verify(q, q, ["assistant: Sure, you can return items within 30 days."],
                        ["assistant: No problem, items can be returned within 30 days."])
    assert idiom.ok


def test_earlier_turns_can_have_checks_of_their_own():
    """A verifier may replace the query's wording checks while earlier turns keep the swap
    check: one swapped word in an earlier turn changes what "it" is."""
    q = "How do I install it?"
    facts = [NegationCheck(), NumberDateCheck(), EntityCheck()]
    hotel = ["user: I'm looking at hotels in Lisbon for next weekend."]
    flight = ["user: I'm looking at flights in Lisbon for next weekend."]
    assert VerificationGate(facts).verify(q, q, hotel, flight).ok
    held = VerificationGate(facts, context_checks=[*facts, SubstitutionCheck()])
    verdict = held.verify(q, q, hotel, flight)
    assert not verdict.ok and verdict.check == "substitution"
    # the query itself is still held only to the query's checks
    assert held.verify("How do I book a hotel in Lisbon?", "How do I book a flight in Lisbon?",
                       hotel, hotel).ok
