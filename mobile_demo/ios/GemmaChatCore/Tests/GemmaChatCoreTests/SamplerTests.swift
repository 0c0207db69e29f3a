import XCTest
@testable import GemmaChatCore

final class SamplerTests: XCTestCase {
    func testFilterKeepsTheVectorsTokens() throws {
        for c in try Vectors.cases(Vectors.load("sampling.json")) {
            let logits = try XCTUnwrap(c["logits"] as? [Double]).map { Float($0) }
            let settings = SamplingSettings(temperature: Float(c["temperature"] as! Double), topK: c["top_k"] as! Int,
                                            topP: Float(c["top_p"] as! Double))
            let kept = Sampler.candidates(logits, settings).map { $0.id }
            XCTAssertEqual(kept, try Vectors.ints(c["kept"]), "\(settings)")
            let sampler = TokenSampler(settings)
            for _ in 0..<200 { XCTAssertTrue(kept.contains(sampler(logits))) }
        }
    }

    func testDrawsAreSeeded() {
        let logits: [Float] = [1.5, -0.5, 3.25, 0.0, 2.75, -2.0, 0.5, 1.0]
        let settings = SamplingSettings(temperature: 1, topK: 0, topP: 1, seed: 3)
        let a = TokenSampler(settings), b = TokenSampler(settings)
        XCTAssertEqual((0..<50).map { _ in a(logits) }, (0..<50).map { _ in b(logits) })
        XCTAssertEqual(Sampler.greedy([1, 3, 3, 0]), 1)
    }
}
