use super::*;

fn render(
    template: &str,
    messages: &[ChatMessage],
    opts: &ChatTemplateOptions,
) -> Result<String, TokenizerError> {
    ChatTemplate::new(Some(template), "<s>", "</s>").apply(messages, opts)
}

fn gen_prompt() -> ChatTemplateOptions {
    ChatTemplateOptions {
        add_generation_prompt: true,
        ..Default::default()
    }
}

#[test]
fn chatml_fallback_renders_a_generation_prompt() {
    let chat = ChatTemplate::new(None, "", "");
    let out = chat
        .apply(&[ChatMessage::new("user", "Hi")], &gen_prompt())
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn blocks_are_trimmed_like_transformers() {
    let template = "{% for m in messages %}\n  {{ m.role }}: {{ m.content | trim }}\n{% endfor %}";
    let out = render(
        template,
        &[ChatMessage::new("user", " x ")],
        &Default::default(),
    )
    .unwrap();
    assert_eq!(out, "  user: x\n");
}

#[test]
fn raise_exception_gives_the_template_message() {
    let template =
        "{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}";
    let err = render(
        template,
        &[ChatMessage::new("user", "x")],
        &Default::default(),
    )
    .unwrap_err();
    match err {
        TokenizerError::Template(message) => assert_eq!(message, "System first!"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn syntax_errors_surface_at_render_time() {
    let chat = ChatTemplate::new(Some("{% for %}"), "", "");
    assert!(chat.compile_error().is_some());
    assert!(matches!(
        chat.apply(&[], &Default::default()),
        Err(TokenizerError::Template(_))
    ));
}

#[test]
fn context_has_tokens_kwargs_extra_fields_and_none_tools() {
    let template = "{{ bos_token }}|{{ eos_token }}|{{ tools is none }}|{{ flag }}|{{ messages[0].name }}|{{ messages[0].content.strip() }}";
    let mut message = ChatMessage::new("user", "  hi  ");
    message.extra.insert("name".into(), "ann".into());
    let mut opts = ChatTemplateOptions::default();
    opts.chat_template_kwargs.insert("flag".into(), true.into());
    // kwargs cannot replace the messages.
    opts.chat_template_kwargs
        .insert("messages".into(), serde_json::json!([]));
    let out = render(template, &[message], &opts).unwrap();
    assert_eq!(out, "<s>|</s>|True|True|ann|hi");
}

#[test]
fn tojson_prints_like_python_json_dumps() {
    let mut opts = ChatTemplateOptions::default();
    opts.chat_template_kwargs.insert(
        "x".into(),
        serde_json::json!({"a": [1, 2.5, 1e-5, true, null], "b": "é\"\n<tag>", "c": {}, "d": 3.0}),
    );
    let out = render("{{ x | tojson }}", &[], &opts).unwrap();
    assert_eq!(
        out,
        r#"{"a": [1, 2.5, 1e-05, true, null], "b": "é\"\n<tag>", "c": {}, "d": 3.0}"#
    );
    let out = render("{{ x.a[:2] | tojson(indent=2) }}", &[], &opts).unwrap();
    assert_eq!(out, "[\n  1,\n  2.5\n]");
    let out = render("{{ x.a[:2] | tojson(4) }}", &[], &opts).unwrap();
    assert_eq!(out, "[\n    1,\n    2.5\n]");
    let template = "{{ x.b | tojson(ensure_ascii=true) }} {{ {'z': 1, 'a': [2]} | tojson(separators=[',', ':'], sort_keys=true) }}";
    let out = render(template, &[], &opts).unwrap();
    assert_eq!(out, r#""\u00e9\"\n<tag>" {"a":[2],"z":1}"#);
    assert!(render("{{ x | tojson(bogus=1) }}", &[], &opts).is_err());
}

#[test]
fn continue_final_message_cuts_after_its_content() {
    let messages = [
        ChatMessage::new("user", "Write a poem"),
        ChatMessage::new("assistant", "Roses are"),
    ];
    let opts = ChatTemplateOptions {
        continue_final_message: true,
        ..Default::default()
    };
    let out = ChatTemplate::new(None, "", "")
        .apply(&messages, &opts)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nWrite a poem<|im_end|>\n<|im_start|>assistant\nRoses are"
    );
    let both = ChatTemplateOptions {
        continue_final_message: true,
        add_generation_prompt: true,
        ..Default::default()
    };
    assert!(ChatTemplate::new(None, "", "")
        .apply(&messages, &both)
        .is_err());
    assert!(ChatTemplate::new(None, "", "").apply(&[], &opts).is_err());
}
