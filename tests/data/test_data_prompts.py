from calibrl.data import format_prompt, to_chat_messages

INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then provide the "
               "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
               "final answer MUST BE put in <answer> </answer> tags.")


def test_paper_template():
    assert format_prompt("What is x?", 1) == "<image> What is x? " + INSTRUCTION
    assert format_prompt("What is x?", 2) == "<image><image> What is x? " + INSTRUCTION
    assert format_prompt("What is x?", 0) == "What is x? " + INSTRUCTION


def test_chat_messages_split_at_placeholders():
    assert to_chat_messages("<image> Count.") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Count."}]}]
    assert to_chat_messages("A <image> and <image>") == [{"role": "user", "content": [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " and "},
        {"type": "image"}]}]
    assert to_chat_messages("no image") == [{"role": "user",
                                             "content": [{"type": "text", "text": "no image"}]}]
