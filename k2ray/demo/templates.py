"""User-turn templates per demo task; phrasing.split_templates keeps every fifth one out of training."""

from __future__ import annotations

ARITHMETIC = (
    "What is {a} {op} {b}?", "{a} {op} {b}", "Calculate {a} {op} {b}.", "what's {a} {op} {b}?",
    "Can you work out {a} {op} {b}?", "{a}{op}{b}=?", "Solve {a} {op} {b} for me.", "How much is {a} {op} {b}?",
    "Quick math: {a} {op} {b}", "Tell me {a} {op} {b}.", "compute {a} {op} {b}", "I need {a} {op} {b}.",
    "Do you know what {a} {op} {b} is?", "{a} {op} {b} equals what?", "Please evaluate {a} {op} {b}.",
    "What do you get for {a} {op} {b}?", "{a} {op} {b} = ?", "Help me with {a} {op} {b}.",
    "what does {a} {op} {b} make", "Find {a} {op} {b}.", "Could you tell me the result of {a} {op} {b}?",
    "What's the answer to {a} {op} {b}?", "{a} {op} {b}, what is it?", "Work this out: {a} {op} {b}",
    "How much do you get from {a} {op} {b}?",
)
ARITHMETIC_FOLLOWUP = (
    "And {op} {b}?", "now {op} {b}", "What if I {op} {b} to that?", "then {op} {b}?", "ok, and that {op} {b}?",
    "Take that and {op} {b}.", "and {op} {b} more?", "next: {op} {b}", "Now do that {op} {b}.",
    "Great. And that {op} {b}?",
)
WEATHER = (
    "What's the weather in {city}?", "weather in {city}", "How's the weather in {city} today?",
    "Is it raining in {city}?", "Tell me the current weather for {city}.", "Can you check the weather in {city} for me?",
    "{city} weather", "what is the weather like in {city} right now", "Could you please look up the weather in {city}?",
    "How is the weather looking in {city}?", "I'm going to {city} today, what's the weather there?",
    "Hey, how hot is it in {city}?", "what's it like outside in {city}?", "current conditions in {city}?",
    "Any idea what the weather is in {city}?", "Do I need an umbrella in {city}?",
    "Give me the weather for {city}.", "weather {city} now", "is it cold in {city} at the moment?",
    "I'd like to know the weather in {city}.", "Please tell me how the weather is in {city}.",
    "What temperature is it in {city}?", "check {city} weather pls", "How warm is it in {city}?",
    "Weather report for {city}, please.", "What are the weather conditions in {city}?",
    "Is it sunny in {city} now?", "Get me the weather in {city}.", "How's {city} looking weather-wise?",
    "What kind of weather are they having in {city}?",
)
WEATHER_FOLLOWUP = (
    "What about {city}?", "and in {city}?", "How about {city}?", "Now check {city}.", "Same for {city} please.",
    "And {city}?", "ok and what's it like in {city}?", "What about the weather in {city}?",
    "Can you also check {city}?", "and {city}, how is it there?",
)
CONVERT = (
    "Convert {value} {src} to {dst}.", "How many {dst} is {value} {src}?", "{value} {src} in {dst}",
    "what is {value} {src} in {dst}?", "Can you convert {value} {src} into {dst}?", "{value} {src} to {dst}",
    "How much is {value} {src} in {dst}?", "Please change {value} {src} to {dst}.",
    "I have {value} {src}, how many {dst} is that?", "convert {value} {src} -> {dst}",
    "What's {value} {src} in {dst}?", "Turn {value} {src} into {dst} please.", "{value} {src} equals how many {dst}?",
    "Could you tell me {value} {src} in {dst}?", "express {value} {src} in {dst}",
    "How many {dst} are there in {value} {src}?", "Quick conversion: {value} {src} to {dst}",
    "I need {value} {src} converted to {dst}.", "{value} {src} is how many {dst}?", "Change {value} {src} into {dst}.",
)
CONVERT_FOLLOWUP = (
    "And in {dst}?", "What about in {dst}?", "now in {dst}", "How many {dst} is that?", "Same thing in {dst}?",
    "and {dst}?", "Convert that to {dst} too.", "ok, in {dst} please", "What is that in {dst}?", "Also in {dst}?",
)
TO_FAHRENHEIT_FOLLOWUP = (
    "What is that in Fahrenheit?", "and in fahrenheit?", "Convert that to °F.", "How much is that in F?",
    "In Fahrenheit please.", "what's that in degrees fahrenheit", "Can you give me that in Fahrenheit?",
    "And in °F?", "ok now in fahrenheit", "Fahrenheit?",
)
SEARCH_WHO = (
    "Who wrote {subject}?", "who is the author of {subject}", "Who created {subject}?", "Tell me who made {subject}.",
    "Do you know who wrote {subject}?", "Who is behind {subject}?", "who wrote {subject}",
    "Can you find out who wrote {subject}?", "Who was the creator of {subject}?", "Look up who made {subject}.",
)
SEARCH_WHAT = (
    "What is {subject}?", "Tell me about {subject}.", "what's {subject}", "Can you look up {subject}?",
    "Search for {subject}.", "I want to know about {subject}.", "Explain {subject} to me.",
    "What do you know about {subject}?", "Give me some facts about {subject}.", "What exactly is {subject}?",
    "Find information on {subject}.", "Look up {subject} for me.", "could you search {subject}",
    "What can you tell me about {subject}?", "Describe {subject}.",
)
SEARCH_FOLLOWUP = (
    "And what about {subject}?", "Now {subject}?", "What about {subject}?", "and {subject}?",
    "Also look up {subject}.", "Next, {subject}.", "ok, and {subject}?", "Same for {subject} please.",
    "How about {subject}?", "Now search {subject}.",
)
UNSUPPORTED_REQUESTS = (
    "Book me a flight to {city}.", "Send an email to my boss.", "Order a pizza for dinner.", "Set an alarm for 7am.",
    "Play some jazz music.", "Call my mom.", "Buy ten shares of Apple.", "Turn off the lights in the kitchen.",
    "Reserve a table for two tonight.", "Text Sarah that I'm late.", "Book a hotel in {city}.",
    "Add milk to my shopping list.", "Schedule a meeting for tomorrow at 3.", "Pay my electricity bill.",
    "Order a taxi to the airport.", "Post this on my Twitter.", "Transfer 100 dollars to John.",
    "Open the garage door.", "Start the washing machine.", "Call a taxi to {city} station.",
    "Record my favourite show tonight.", "Print my boarding pass.", "Delete my old photos.",
    "Lock the front door.", "Remind me to water the plants.",
)
DECLINE_NO_WEATHER = (
    "What's the weather in {city}?", "Is it raining in {city}?", "how hot is it in {city}",
    "Check the weather in {city}.", "weather in {city} please",
)
# Unit words users type -> the convert_units enum value.
UNIT_WORDS: dict[str, tuple[str, ...]] = {
    "km": ("km", "kilometers", "kilometres", "KM"),
    "mi": ("miles", "mi", "mile"),
    "m": ("m", "meters", "metres"),
    "ft": ("ft", "feet", "foot"),
    "kg": ("kg", "kilograms", "kilos", "KG"),
    "lb": ("lb", "pounds", "lbs"),
    "c": ("°C", "celsius", "degrees Celsius", "C"),
    "f": ("°F", "fahrenheit", "degrees Fahrenheit", "F"),
}
UNIT_DISPLAY = {"km": "km", "mi": "mi", "m": "m", "ft": "ft", "kg": "kg", "lb": "lb", "c": "°C", "f": "°F"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OP_FORMS = {"+": ("+", "plus"), "-": ("-", "minus"), "×": ("×", "*", "x", "times", "multiplied by")}
FOLLOWUP_OP_FORMS = {"+": ("plus", "add", "+"), "-": ("minus", "subtract", "-"), "×": ("times", "multiply by", "×")}
OP_WORDS = {"+": "plus", "-": "minus", "×": "times"}
