"""The 40 instruction templates of stage 2: 10 for each case (context or not x query or not).

``{audio}`` marks where the adapter outputs are spliced in, ``{context}`` the previous turns and
``{labels}`` the queried slot labels. Every template asks for JSON output.
"""

from __future__ import annotations

AUDIO = "<audio>"
TRANSCRIPT = '(transcript) "{text}"'  # what stands in the audio's place in a cascade prompt


def text_prompt(prompt: str, transcript: str) -> str:
    """The cascade's prompt: the same instruction with the ASR transcript where the audio would be."""
    return prompt.replace(AUDIO, TRANSCRIPT.format(text=transcript))

NO_CONTEXT_NO_QUERY = (
    "{audio}\nFind all slot values in the current audio. Format the output as JSON.",
    "{audio}\nExtract every slot and its value mentioned in this audio clip. Answer in JSON.",
    "{audio}\nListen to the utterance and list the slots it fills, as a JSON object.",
    "{audio}\nWhat slot values are mentioned in this audio? Return them as JSON.",
    "{audio}\nIdentify the entities, dates, amounts and other slot values in the audio. Output JSON.",
    "{audio}\nFill the slots for the current turn of the call. Give the result as JSON.",
    "Here is a turn of a call: {audio}\nReturn all slot labels and values you hear, formatted as JSON.",
    "{audio}\nAnnotate this utterance with slot labels and values. Use JSON.",
    "Audio: {audio}\nTask: slot filling. Write every slot found as a JSON object.",
    "{audio}\nPlease find the information-bearing slots in this turn and format them as JSON.",
)
NO_CONTEXT_QUERY = (
    "{audio}\nFind slot values for {labels} in the current audio. Format the output as JSON.",
    "{audio}\nExtract the values of {labels} from this audio clip. Answer in JSON.",
    "{audio}\nListen to the utterance and fill these slots: {labels}. Return JSON.",
    "{audio}\nWhat are the values of {labels} in this audio? Use 'None' when absent. Output JSON.",
    "{audio}\nFor each of {labels}, give the value mentioned in the audio as JSON.",
    "Here is a turn of a call: {audio}\nFill the slots {labels} and format the output as JSON.",
    "{audio}\nSlot filling for the labels {labels}. Answer with a JSON object.",
    "Audio: {audio}\nTask: find {labels}. Write the result as JSON.",
    "{audio}\nPlease report the values of {labels} heard in this turn, as JSON.",
    "{audio}\nWhich values do {labels} take in the current audio? Give JSON.",
)
CONTEXT_NO_QUERY = (
    "Previous turns:\n{context}\nCurrent turn: {audio}\nFind all slot values in the current audio. Format the output as JSON.",
    "Conversation so far:\n{context}\nNow listen to {audio}\nExtract every slot and value of the current turn as JSON.",
    "Context:\n{context}\n{audio}\nGiven the context, list the slots filled in the current audio, in JSON.",
    "The call so far:\n{context}\nNext turn: {audio}\nWhat slot values does this turn mention? Answer in JSON.",
    "Earlier in the call:\n{context}\n{audio}\nIdentify the slot values in the current audio. Output JSON.",
    "Dialogue history:\n{context}\nCurrent audio: {audio}\nFill the slots of the current turn as a JSON object.",
    "{context}\nThose were the previous turns. Here is the current one: {audio}\nReturn its slots as JSON.",
    "History:\n{context}\nAudio: {audio}\nTask: slot filling for the current turn. Use JSON.",
    "Previous turns of the conversation:\n{context}\n{audio}\nAnnotate the current utterance with slot labels and values in JSON.",
    "Context turns:\n{context}\nCurrent turn audio: {audio}\nPlease give every slot found in it as JSON.",
)
CONTEXT_QUERY = (
    "Previous turns:\n{context}\nCurrent turn: {audio}\nFind slot values for {labels} in the current audio. Format the output as JSON.",
    "Conversation so far:\n{context}\nNow listen to {audio}\nExtract the values of {labels} from the current turn as JSON.",
    "Context:\n{context}\n{audio}\nGiven the context, fill {labels} for the current audio, in JSON.",
    "The call so far:\n{context}\nNext turn: {audio}\nWhat are {labels} in this turn? Use 'None' when absent. Answer in JSON.",
    "Earlier in the call:\n{context}\n{audio}\nFor each of {labels}, give the value in the current audio. Output JSON.",
    "Dialogue history:\n{context}\nCurrent audio: {audio}\nFill the slots {labels} as a JSON object.",
    "{context}\nThose were the previous turns. Here is the current one: {audio}\nReport {labels} as JSON.",
    "History:\n{context}\nAudio: {audio}\nTask: find {labels} in the current turn. Use JSON.",
    "Previous turns of the conversation:\n{context}\n{audio}\nSlot filling for the labels {labels} in the current utterance. JSON please.",
    "Context turns:\n{context}\nCurrent turn audio: {audio}\nWhich values do {labels} take in it? Give JSON.",
)

TEMPLATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (False, False): NO_CONTEXT_NO_QUERY,
    (False, True): NO_CONTEXT_QUERY,
    (True, False): CONTEXT_NO_QUERY,
    (True, True): CONTEXT_QUERY,
}

THINK, NO_THINK = "/think", "/no_think"
