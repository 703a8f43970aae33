"""Slot inventories and domain phrasing for the synthetic call-centre corpus.

Four domains as in the paper (banking, telecommunications, insurance, retail). Every slot concept has
a descriptive label, other names for it (``ALIASES``: each call draws one), a one-line description
(used by the reasoning trace), the phrase an agent uses for it, a value generator and a few
slot-specific customer answers (``{v}`` = value).
"""

from __future__ import annotations

from dataclasses import dataclass

from speechllm.corpus import values as V


@dataclass(frozen=True)
class SlotType:
    label: str
    description: str
    phrase: str
    draw: V.ValueFn
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Domain:
    name: str
    companies: tuple[str, ...]
    slots: tuple[SlotType, ...]
    # customer openings; ``{slot_label}`` placeholders are filled and become slots of the turn
    openings: tuple[str, ...]


SHARED = (
    SlotType("customer_name", "full name of the calling customer", "name on the account", V.full_name,
             ("The account is under {v}.", "My name is {v}.")),
    SlotType("callback_number", "phone number the customer can be called back on", "best callback number",
             V.phone_number, ("You can reach me at {v}.", "Call me back on {v}.")),
    SlotType("preferred_contact_day", "weekday the customer prefers to be contacted",
             "best day to contact you", V.weekday, ("{v} works best for me.", "Any time on {v}.")),
)

BANKING = Domain(
    "banking", ("First Harbor Bank", "Union Savings", "Crest Credit Union"),
    SHARED + (
        SlotType("account_type", "kind of bank account discussed", "type of account",
                 V.one_of("checking account", "savings account", "joint account", "business account"),
                 ("It's my {v}.", "The {v}, please.")),
        SlotType("card_type", "kind of payment card", "type of card",
                 V.one_of("debit card", "credit card", "platinum card", "prepaid card"),
                 ("It's the {v}.",)),
        SlotType("last_four_digits", "last four digits of the card or account number",
                 "last four digits of the card", V.digits(4), ("They are {v}.", "It ends in {v}.")),
        SlotType("payment_amount", "amount of a payment", "payment amount", V.money(20, 900),
                 ("I pay {v} each time.", "I want to pay {v}.")),
        SlotType("payment_frequency", "how often a payment recurs", "payment frequency",
                 V.one_of("monthly", "weekly", "every two weeks", "quarterly", "yearly"),
                 ("I'd like to pay {v}.", "I make the payment {v}.")),
        SlotType("payment_date", "date a payment is made or due", "payment date", V.date,
                 ("It goes out on {v}.",)),
        SlotType("new_limit", "requested new credit or spending limit", "new limit",
                 V.money(1000, 20000, 500), ("I'd like it raised to {v}.", "Can you make it {v}?")),
        SlotType("transfer_amount", "amount of money to transfer", "transfer amount", V.money(50, 5000, 50),
                 ("I need to transfer {v}.",)),
        SlotType("recipient_name", "person receiving a transfer", "name of the recipient", V.full_name,
                 ("It's going to {v}.", "Send it to {v}.")),
        SlotType("loan_amount", "principal of a loan", "loan amount", V.money(2000, 50000, 1000),
                 ("I'm looking to borrow {v}.",)),
        SlotType("loan_term", "length of a loan", "loan term", V.duration(("year",), 1, 10),
                 ("Over {v}, if possible.",)),
        SlotType("interest_rate", "interest rate mentioned", "interest rate", V.percent(1.5, 19.9),
                 ("I was told {v}.",)),
        SlotType("branch_location", "city of the bank branch", "branch location", V.city,
                 ("The branch in {v}.",)),
        SlotType("transaction_date", "date of a disputed or queried transaction", "transaction date",
                 V.date, ("It happened on {v}.",)),
        SlotType("merchant_name", "shop or company a card transaction was made with", "merchant name",
                 V.one_of("Greenleaf Market", "Metro Fuel", "Bluebird Cafe", "Northside Electronics"),
                 ("It says {v} on the statement.",)),
        SlotType("review_period", "time until a request is reviewed again", "review period",
                 V.duration(("month", "week"), 1, 12), ("Can we look again in {v}?",)),
    ),
    (
        "Hi, I'd like to raise my credit limit to {new_limit}.",
        "Hello, I want to set up a {payment_frequency} payment.",
        "Hi there, I don't recognise a charge from {merchant_name}.",
        "Good morning, I need to transfer {transfer_amount} to my sister.",
        "Hi, I'm calling about a loan of {loan_amount}.",
        "Hello, my {card_type} was declined today.",
    ),
)

TELECOM = Domain(
    "telecommunications", ("Skyline Mobile", "NetWave Telecom", "Horizon Fiber"),
    SHARED + (
        SlotType("plan_name", "name of the mobile or internet plan", "plan name",
                 V.one_of("Unlimited Plus", "Basic Talk", "Family Share", "Fiber 500", "Data Max"),
                 ("I'm on {v}.", "I'd like the {v} plan.")),
        SlotType("monthly_fee", "monthly price of a plan or service", "monthly fee", V.money(15, 140),
                 ("I'm paying {v} a month.",)),
        SlotType("data_allowance", "amount of mobile data in the plan", "data allowance",
                 V.quantity(5, 100, "gigabytes"), ("I get {v}.",)),
        SlotType("device_model", "phone, router or device model", "device model",
                 V.one_of("Pixel 8", "iPhone 15", "Galaxy S24", "Moto G", "router X200"),
                 ("It's a {v}.", "I have the {v}.")),
        SlotType("contract_length", "length of the service contract", "contract length",
                 V.duration(("month",), 6, 36), ("The contract is {v}.",)),
        SlotType("family_members_count", "number of family members or lines on a shared plan",
                 "number of lines", V.count(2, 6), ("There are {v} of us.", "{v} lines in total.")),
        SlotType("service_address", "street address where the service is installed", "service address",
                 V.address, ("It's at {v}.",)),
        SlotType("outage_start_date", "date a service outage began", "date the outage started", V.date,
                 ("It stopped working on {v}.",)),
        SlotType("appointment_date", "date of a technician visit", "appointment date", V.date,
                 ("Could they come on {v}?",)),
        SlotType("appointment_time", "time of a technician visit", "appointment time", V.time_of_day,
                 ("Around {v} would be good.",)),
        SlotType("travel_destination", "country the customer is travelling to", "destination",
                 V.one_of("Spain", "Japan", "Mexico", "Canada", "Italy", "Brazil"),
                 ("I'm travelling to {v}.",)),
        SlotType("roaming_package", "name of the roaming add-on", "roaming package",
                 V.one_of("Travel Pass", "World Roam", "Euro Saver"), ("I'd like {v}.",)),
        SlotType("bill_amount", "amount of a bill", "bill amount", V.money(30, 400),
                 ("My bill was {v}.",)),
        SlotType("billing_date", "date the bill is issued or due", "billing date", V.date,
                 ("It's due on {v}.",)),
        SlotType("sim_type", "kind of SIM card", "type of SIM",
                 V.one_of("eSIM", "nano SIM", "micro SIM"), ("I need an {v}.", "A {v}, please.")),
    ),
    (
        "Hi, I want to switch to the {plan_name} plan.",
        "Hello, my internet has been down since {outage_start_date}.",
        "Hi, I'm going to {travel_destination} next week and need roaming.",
        "Hello, my bill this month was {bill_amount}, which seems too high.",
        "Hi, I'd like to add lines for {family_members_count} people.",
        "Good afternoon, I need a new {sim_type}.",
    ),
)

INSURANCE = Domain(
    "insurance", ("Evergreen Insurance", "Safeway Mutual", "Beacon Assurance"),
    SHARED + (
        SlotType("policy_type", "kind of insurance policy", "type of policy",
                 V.one_of("car insurance", "home insurance", "life insurance", "travel insurance",
                          "pet insurance"), ("It's my {v}.",)),
        SlotType("policy_name", "product name of the policy", "policy name",
                 V.one_of("Gold Cover", "Essential Shield", "Family Protect", "Premier Plus"),
                 ("I have {v}.", "It's the {v} policy.")),
        SlotType("policy_number", "identifier of the policy, read as digits", "policy number",
                 V.digits(6), ("It's {v}.",)),
        SlotType("claim_amount", "amount claimed", "claim amount", V.money(200, 15000, 50),
                 ("The damage comes to about {v}.",)),
        SlotType("incident_date", "date the incident happened", "date of the incident", V.date,
                 ("It happened on {v}.",)),
        SlotType("incident_location", "city where the incident happened", "location of the incident",
                 V.city, ("It was in {v}.",)),
        SlotType("vehicle_model", "make and model of the insured vehicle", "vehicle model",
                 V.one_of("Toyota Corolla", "Ford Focus", "Honda Civic", "Tesla Model 3", "Volvo XC60"),
                 ("I drive a {v}.",)),
        SlotType("deductible_amount", "deductible or excess of the policy", "deductible", V.money(100, 2000, 50),
                 ("My deductible is {v}.",)),
        SlotType("premium_amount", "price of the policy", "premium", V.money(20, 300),
                 ("I pay {v} for it.",)),
        SlotType("coverage_limit", "maximum amount the policy pays", "coverage limit",
                 V.money(10000, 500000, 5000), ("I want cover up to {v}.",)),
        SlotType("beneficiary_name", "person named as beneficiary", "beneficiary", V.full_name,
                 ("I'd like to add {v}.",)),
        SlotType("family_members_count", "number of family members covered", "number of people covered",
                 V.count(2, 6), ("There are {v} of us.",)),
        SlotType("renewal_date", "date the policy renews", "renewal date", V.date,
                 ("It renews on {v}.",)),
        SlotType("payment_frequency", "how often the premium is paid", "payment frequency",
                 V.one_of("monthly", "quarterly", "yearly", "every six months"), ("I pay {v}.",)),
        SlotType("property_address", "address of the insured property", "property address", V.address,
                 ("The house is at {v}.",)),
        SlotType("review_period", "time until the policy or claim is reviewed", "review period",
                 V.duration(("month", "week"), 1, 12), ("Can it be reviewed in {v}?",)),
    ),
    (
        "Hi, I need to make a claim, there was an accident on {incident_date}.",
        "Hello, I'd like to add {beneficiary_name} to my life insurance.",
        "Hi, my {policy_type} is up for renewal.",
        "Hello, I want a quote for my {vehicle_model}.",
        "Hi, I'm calling about my {policy_name} policy.",
        "Hello, there was water damage at {property_address}.",
    ),
)

RETAIL = Domain(
    "retail", ("Maple & Co", "BrightMart", "Urban Threads"),
    SHARED + (
        SlotType("order_number", "identifier of the order, read as digits", "order number", V.digits(5),
                 ("It's order {v}.", "The number is {v}.")),
        SlotType("product_name", "item bought or asked about", "product",
                 V.one_of("running shoes", "winter jacket", "coffee maker", "desk lamp", "wireless headphones",
                          "yoga mat"), ("I ordered the {v}.", "It's the {v}.")),
        SlotType("product_size", "clothing or item size", "size",
                 V.one_of("small", "medium", "large", "extra large", "size 9", "size 42"),
                 ("I need a {v}.", "In {v}, please.")),
        SlotType("product_color", "colour of the item", "colour",
                 V.one_of("black", "navy blue", "red", "forest green", "white", "grey"),
                 ("The {v} one.",)),
        SlotType("quantity", "number of items", "quantity", V.count(1, 8),
                 ("I'd like {v} of them.",)),
        SlotType("delivery_date", "date of delivery", "delivery date", V.date,
                 ("It was supposed to arrive on {v}.",)),
        SlotType("delivery_address", "address the order goes to", "delivery address", V.address,
                 ("Please send it to {v}.",)),
        SlotType("refund_amount", "amount to be refunded", "refund amount", V.money(10, 600),
                 ("I paid {v} for it.",)),
        SlotType("store_location", "city of the physical store", "store location", V.city,
                 ("The store in {v}.",)),
        SlotType("purchase_date", "date the item was bought", "purchase date", V.date,
                 ("I bought it on {v}.",)),
        SlotType("payment_method", "how the customer paid", "payment method",
                 V.one_of("credit card", "gift card", "PayPal", "cash", "store credit"),
                 ("I paid by {v}.", "With {v}.")),
        SlotType("discount_code", "promotion code, read as a word and number", "discount code",
                 V.one_of("SPRING 20", "WELCOME 10", "SAVE 15", "FALL 25"), ("I used the code {v}.",)),
        SlotType("loyalty_points", "number of reward points", "points balance", V.quantity(100, 5000, "points"),
                 ("I have {v}.",)),
        SlotType("shipping_method", "delivery speed or carrier option", "shipping method",
                 V.one_of("express shipping", "standard delivery", "next day delivery", "store pickup"),
                 ("I chose {v}.",)),
        SlotType("pickup_time", "time the customer collects an order", "pickup time", V.time_of_day,
                 ("I can come by at {v}.",)),
    ),
    (
        "Hi, I want to return the {product_name} I bought.",
        "Hello, my order {order_number} hasn't arrived yet.",
        "Hi, I was charged twice, I paid with {payment_method}.",
        "Hello, do you have this in {product_size}?",
        "Hi, my discount code {discount_code} didn't work.",
        "Hello, I'd like to change the delivery address to {delivery_address}.",
    ),
)

DOMAINS: dict[str, Domain] = {d.name: d for d in (BANKING, TELECOM, INSURANCE, RETAIL)}

# Other names of each slot concept. The paper's labels were open-ended (GPT-4o named them turn by
# turn, unprimed), so the generator does not name a concept the same way in every call: each call
# draws one name per concept from the label above and these (``generate_call``).
ALIASES: dict[str, tuple[str, ...]] = {
    "customer_name": ("caller_name", "account_holder_name"),
    "callback_number": ("contact_number", "phone_number"),
    "preferred_contact_day": ("contact_day", "best_day_to_call"),
    "account_type": ("bank_account_type", "account_kind"),
    "card_type": ("payment_card_type", "card_kind"),
    "last_four_digits": ("card_last_four", "account_last_digits"),
    "payment_amount": ("amount_paid", "payment_sum"),
    "payment_frequency": ("payment_schedule", "billing_frequency"),
    "payment_date": ("payment_due_date", "date_of_payment"),
    "new_limit": ("requested_limit", "new_credit_limit"),
    "transfer_amount": ("amount_to_transfer", "transfer_sum"),
    "recipient_name": ("payee_name", "transfer_recipient"),
    "loan_amount": ("loan_principal", "borrowed_amount"),
    "loan_term": ("loan_duration", "repayment_period"),
    "interest_rate": ("rate_of_interest", "apr"),
    "branch_location": ("branch_city", "bank_branch"),
    "transaction_date": ("charge_date", "date_of_transaction"),
    "merchant_name": ("merchant", "vendor_name"),
    "review_period": ("review_interval", "time_until_review"),
    "plan_name": ("service_plan", "tariff_name"),
    "monthly_fee": ("monthly_price", "monthly_charge"),
    "data_allowance": ("data_limit", "data_plan_size"),
    "device_model": ("phone_model", "device_name"),
    "contract_length": ("contract_term", "contract_duration"),
    "family_members_count": ("number_of_family_members", "household_size"),
    "service_address": ("installation_address", "service_location"),
    "outage_start_date": ("outage_date", "service_down_since"),
    "appointment_date": ("technician_visit_date", "visit_date"),
    "appointment_time": ("technician_visit_time", "visit_time"),
    "travel_destination": ("destination_country", "trip_destination"),
    "roaming_package": ("roaming_plan", "roaming_add_on"),
    "bill_amount": ("amount_billed", "bill_total"),
    "billing_date": ("bill_date", "statement_date"),
    "sim_type": ("sim_card_type", "sim_format"),
    "policy_type": ("insurance_type", "coverage_type"),
    "policy_name": ("insurance_plan_name", "plan_of_cover"),
    "policy_number": ("policy_id", "insurance_policy_number"),
    "claim_amount": ("amount_claimed", "claim_value"),
    "incident_date": ("date_of_incident", "accident_date"),
    "incident_location": ("place_of_incident", "accident_location"),
    "vehicle_model": ("car_model", "insured_vehicle"),
    "deductible_amount": ("deductible", "excess_amount"),
    "premium_amount": ("insurance_premium", "premium_cost"),
    "coverage_limit": ("maximum_coverage", "cover_limit"),
    "beneficiary_name": ("policy_beneficiary", "named_beneficiary"),
    "renewal_date": ("policy_renewal_date", "date_of_renewal"),
    "property_address": ("insured_property_address", "home_address"),
    "order_number": ("order_id", "order_reference"),
    "product_name": ("item_name", "product"),
    "product_size": ("item_size", "size"),
    "product_color": ("item_color", "colour"),
    "quantity": ("item_count", "number_of_items"),
    "delivery_date": ("expected_delivery_date", "arrival_date"),
    "delivery_address": ("shipping_address", "address_for_delivery"),
    "refund_amount": ("amount_refunded", "refund_value"),
    "store_location": ("store_city", "shop_location"),
    "purchase_date": ("date_of_purchase", "order_date"),
    "payment_method": ("method_of_payment", "paid_with"),
    "discount_code": ("promo_code", "coupon_code"),
    "loyalty_points": ("reward_points", "points_balance"),
    "shipping_method": ("delivery_method", "shipping_option"),
    "pickup_time": ("collection_time", "pickup_slot"),
}

GREETINGS = (
    "Thank you for calling {company}, my name is {agent}. How can I help you today?",
    "Good morning, you're through to {company}. This is {agent} speaking, how may I help?",
    "Hello and welcome to {company}, {agent} here. What can I do for you?",
    "Thanks for calling {company}. My name is {agent}, how can I assist you?",
)
ASKS = (
    "Could you tell me the {phrase}, please?",
    "What is the {phrase}?",
    "May I have the {phrase}?",
    "Okay. And what {phrase} did you have in mind?",
    "Can you give me the {phrase} for that?",
    "Let me note that down. What's the {phrase}?",
    "Sure, I can help with that. What would the {phrase} be?",
    "Alright. Which {phrase} should I put down?",
    "I just need a few details. What's the {phrase}?",
    "Got it. And the {phrase}?",
)
ANSWERS = (
    "It's {v}.", "That would be {v}.", "{v}.", "Sure, it's {v}.", "I think it's {v}.",
    "Let me check, it's {v}.", "Yes, {v}.", "The {phrase} is {v}.", "Um, {v}, I believe.",
    "It should be {v}.",
)
CONFIRM_ONE = (
    "Just to confirm, the {p1} is {v1}, is that right?",
    "So I have {v1} as the {p1}. Correct?",
    "Let me read that back: {v1}. Is that correct?",
)
CONFIRM_TWO = (
    "Alright, so the {p1} is {v1} and the {p2} is {v2}. Is that correct?",
    "Let me confirm: {v1} for the {p1}, and {v2} for the {p2}?",
    "Okay, I've got {v1} as the {p1} and {v2} as the {p2}. Does that sound right?",
)
AFFIRM = ("Yes, that's correct.", "Yes, that's right.", "Correct.", "Yep, that's it.", "That's right, thanks.")
CORRECTIONS = (
    "Actually, the {p} should be {v}.",
    "Sorry, I made a mistake. The {p} is {v}.",
    "Oh wait, can we make it {v} instead?",
)
CORRECTION_ACKS = (
    "No problem, I've updated the {p} to {v}.",
    "Thanks, I've changed it to {v}.",
    "Okay, {v} it is.",
)
CLOSE_AGENT = (
    "Is there anything else I can help you with today?",
    "Is there anything else I can do for you?",
)
CLOSE_CUSTOMER = ("No, that's all. Thank you.", "No, that's everything, thanks.", "That's it, thanks a lot.")
GOODBYES = ("Thank you for calling, {name}. Have a great day.", "You're welcome, {name}. Goodbye.",
            "Thanks again, {name}, take care.")
