"""OpenAI's Videos API shape, translated to and from Seedance; pure (no I/O, no web framework).

    translate  OpenAI create fields → a Seedance body, and the facts a Video is drawn from
    view       Video objects and lists as OpenAI's clients expect them
    bridge     a stored task → the facts and answers the OpenAI shape needs
    upload     an uploaded image or a long data: URL, kept out of memory until the body to send is written

May import: store (its Task type), policy and the shared nouns.
"""
