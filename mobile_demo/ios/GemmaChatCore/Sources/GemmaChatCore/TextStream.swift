/// Streams the text of a reply token by token without splitting a multi-byte character: each push
/// returns only the text the new token completed. Works on Unicode scalars, so a combining mark that
/// joins the previous character still arrives as its own delta.
public struct TextStream {
    private let decode: ([Int]) -> String
    private var ids: [Int] = []
    private var shown: [Unicode.Scalar] = []

    public init(decode: @escaping ([Int]) -> String) {
        self.decode = decode
    }

    public mutating func push(_ id: Int) -> String {
        ids.append(id)
        let text = Array(decode(ids).unicodeScalars)
        // U+FFFD at the end: the token ended inside a UTF-8 sequence; wait for the rest.
        if text.last == "\u{FFFD}" { return "" }
        guard text.count >= shown.count, Array(text[..<shown.count]) == shown else {
            shown = text // the decoder revised earlier text (rare); continue from its new rendering
            return ""
        }
        var delta = String.UnicodeScalarView()
        delta.append(contentsOf: text[shown.count...])
        shown = text
        return String(delta)
    }
}
